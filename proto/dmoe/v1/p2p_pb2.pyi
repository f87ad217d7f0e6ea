from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class P2PRequest(_message.Message):
    __slots__ = ("message", "swarm_key", "client_id", "timeout")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SWARM_KEY_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    message: bytes
    swarm_key: str
    client_id: str
    timeout: float
    def __init__(self, message: _Optional[bytes] = ..., swarm_key: _Optional[str] = ..., client_id: _Optional[str] = ..., timeout: _Optional[float] = ...) -> None: ...

class P2PResponse(_message.Message):
    __slots__ = ("message", "code", "details")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    message: bytes
    code: int
    details: str
    def __init__(self, message: _Optional[bytes] = ..., code: _Optional[int] = ..., details: _Optional[str] = ...) -> None: ...
