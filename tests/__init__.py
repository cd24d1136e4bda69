"""pytest suite: a package, so helper modules are imported explicitly (from .reference_vision import ...)."""
