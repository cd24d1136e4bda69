"""PLACEHOLDER (being written by a helper)."""
def parse_mmproj_type(name): return name
