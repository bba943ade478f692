"""The compressor service: ``compress`` jobs in, smaller registered variants out."""
