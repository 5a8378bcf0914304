"""Client-data: caller profiles prepared after each call, answered while the phone rings."""
