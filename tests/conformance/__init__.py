"""Every format through every caller (see formats.py)."""
