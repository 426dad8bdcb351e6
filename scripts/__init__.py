"""Developer scripts: the fixture web and corpus builders over ../shared/data."""
