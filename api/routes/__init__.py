"""One router per concern: ``health`` (liveness, readiness), ``chat`` (turns and their streams), ``conversations``."""
