"""Per-turn LangGraph state machine: decides when to search and assembles the cited answer."""
