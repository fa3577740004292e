"""Reading records and mapping formats to canonical (TRL-named) records."""
