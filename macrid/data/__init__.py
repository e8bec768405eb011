"""Data: raw interactions -> the lake's prepared datasets -> sparse user batches (local or S3, Ray Data)."""
