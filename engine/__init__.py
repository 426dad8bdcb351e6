"""Model engines (embedded vLLM, remote OpenAI-compatible) and the Megrez protocol codec."""
