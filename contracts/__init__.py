"""The node's contracts, each declared once as a typed ``msgspec.Struct``.

REST bodies the Network Node sends, and the messages services exchange over the bus, live here so
that the gateway (which validates requests and publishes the OpenAPI document), the services (which
receive the typed value) and the tests all read one definition. Nothing here knows HTTP or ZeroMQ.
"""
