"""The mediator core: messages, handlers, behaviors, local dispatch and the wire envelope.

Pure asyncio and pydantic: nothing here imports FastAPI or a broker client.
"""
