"""Label transfer: chosen supports (image + mask) -> masks for the query volume."""
