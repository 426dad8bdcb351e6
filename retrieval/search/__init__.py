"""Search backends behind one interface, the fallback chain and the result cache."""
