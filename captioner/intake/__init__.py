"""Where an image is born: uploads, zips, URLs, prefixes and keys, safe decoding."""
