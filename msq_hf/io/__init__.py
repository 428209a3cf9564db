"""On-disk formats: the bit-packed export (write, read, verify, inspect) and its model card."""
