"""The napari plugin (the ``napari`` extra): a dock widget that segments an image layer from a
Shapes layer's rectangles and from Points layers, propagates through volumes and writes a Labels
layer. The npe2 manifest is ``napari.yaml`` beside this file; nothing is imported here, so napari
reads the manifest without loading torch."""
