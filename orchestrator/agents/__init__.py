"""Agents: tools an LLM may call (:mod:`.tools`, :mod:`.builtin`) and the durable tool loop (:mod:`.loop`)."""
