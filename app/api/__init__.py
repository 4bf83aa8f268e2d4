"""HTTP routes (thin): images, search, health; their dependencies and upload limits."""
