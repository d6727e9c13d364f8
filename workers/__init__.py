"""Workers: queue → batch → run → write. Embedded (in-process) and Redis stream consumers."""
