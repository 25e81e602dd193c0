"""mil: attention multiple-instance learning over featstore embeddings."""
