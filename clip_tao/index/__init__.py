"""Approximate nearest-neighbour indexes of embedding collections of any size (FAISS), and deduplication."""
