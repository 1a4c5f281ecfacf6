"""Model families, one plain-torch file each."""
