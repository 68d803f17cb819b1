"""What tasks write: status.json, results.json, embeddings .h5, tables — always atomically."""
