"""Dataset curation: turning raw medical images into MedSAM-ready inputs."""
