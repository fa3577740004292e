"""Files shipped inside the package (the demo recipe)."""
