"""LangGraph agents on Ray Serve: tools (retrieval, calculator, MCP), a supervisor, durable threads."""
