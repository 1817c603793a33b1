"""PostgreSQL protocol v3 messages as small frozen values.

Each class knows its one-letter type code, how to decode its body and how to encode itself
as a whole frame (type byte, int32 length that counts itself, body).  Several letters mean
one thing from the client and another from the server ('D' is Describe going up and DataRow
coming down), so the messages live by direction: ``startup`` (the untyped first packets),
``frontend`` (what a client sends) and ``backend`` (what a server sends), and decoding is
split into ``decode.decode_frontend`` and ``decode.decode_backend``.  ``heads`` reads the few
fields the relay needs without building whole messages; ``wire`` has the framing primitives
they are all built from, and ``errors`` the protocol errors.

Only the decoders raise, and only ``ProtocolError`` (or its two subclasses): any byte string
either decodes or is refused with a reason, which the property tests check.
"""
