"""The vector index: FAISS with ids, atomic save/load and a manifest. No model, no database."""
