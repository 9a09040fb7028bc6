"""One FastAPI router per resource: images, embeddings, segment, labels, propagate, next, jobs."""
