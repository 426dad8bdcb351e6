"""Search, fetch, extract and select: turning a question into cited context."""
