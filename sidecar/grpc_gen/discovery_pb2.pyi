from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Agent(_message.Message):
    __slots__ = ("id", "name", "version", "address", "port", "protocol", "tags", "metadata", "health", "capabilities", "register_time", "ttl", "weight", "zone", "pending")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    REGISTER_TIME_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    version: str
    address: str
    port: int
    protocol: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    metadata: _containers.ScalarMap[str, str]
    health: Health
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    register_time: str
    ttl: int
    weight: int
    zone: str
    pending: bool
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., address: _Optional[str] = ..., port: _Optional[int] = ..., protocol: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., health: _Optional[_Union[Health, _Mapping]] = ..., capabilities: _Optional[_Iterable[str]] = ..., register_time: _Optional[str] = ..., ttl: _Optional[int] = ..., weight: _Optional[int] = ..., zone: _Optional[str] = ..., pending: _Optional[bool] = ...) -> None: ...

class Health(_message.Message):
    __slots__ = ("type", "url", "interval", "timeout", "status")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    type: str
    url: str
    interval: int
    timeout: int
    status: str
    def __init__(self, type: _Optional[str] = ..., url: _Optional[str] = ..., interval: _Optional[int] = ..., timeout: _Optional[int] = ..., status: _Optional[str] = ...) -> None: ...

class DiscoverRequest(_message.Message):
    __slots__ = ("capability", "tags", "name", "id", "healthy_only", "include_cards")
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_ONLY_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_CARDS_FIELD_NUMBER: _ClassVar[int]
    capability: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    name: str
    id: str
    healthy_only: bool
    include_cards: bool
    def __init__(self, capability: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., name: _Optional[str] = ..., id: _Optional[str] = ..., healthy_only: _Optional[bool] = ..., include_cards: _Optional[bool] = ...) -> None: ...

class DiscoverResponse(_message.Message):
    __slots__ = ("revision", "agents", "cards")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    CARDS_FIELD_NUMBER: _ClassVar[int]
    revision: int
    agents: _containers.RepeatedCompositeFieldContainer[Agent]
    cards: _containers.RepeatedCompositeFieldContainer[AgentCard]
    def __init__(self, revision: _Optional[int] = ..., agents: _Optional[_Iterable[_Union[Agent, _Mapping]]] = ..., cards: _Optional[_Iterable[_Union[AgentCard, _Mapping]]] = ...) -> None: ...

class AgentCard(_message.Message):
    __slots__ = ("agent_id", "name", "revision", "card_json")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CARD_JSON_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    name: str
    revision: int
    card_json: str
    def __init__(self, agent_id: _Optional[str] = ..., name: _Optional[str] = ..., revision: _Optional[int] = ..., card_json: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("capability", "tags", "name", "from_revision")
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    FROM_REVISION_FIELD_NUMBER: _ClassVar[int]
    capability: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    name: str
    from_revision: int
    def __init__(self, capability: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., name: _Optional[str] = ..., from_revision: _Optional[int] = ...) -> None: ...

class WatchEvent(_message.Message):
    __slots__ = ("type", "revision", "agents")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TYPE_UNSPECIFIED: _ClassVar[WatchEvent.Type]
        SNAPSHOT: _ClassVar[WatchEvent.Type]
        UPSERT: _ClassVar[WatchEvent.Type]
        DELETE: _ClassVar[WatchEvent.Type]
        RELIST: _ClassVar[WatchEvent.Type]
    TYPE_UNSPECIFIED: WatchEvent.Type
    SNAPSHOT: WatchEvent.Type
    UPSERT: WatchEvent.Type
    DELETE: WatchEvent.Type
    RELIST: WatchEvent.Type
    TYPE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    type: WatchEvent.Type
    revision: int
    agents: _containers.RepeatedCompositeFieldContainer[Agent]
    def __init__(self, type: _Optional[_Union[WatchEvent.Type, str]] = ..., revision: _Optional[int] = ..., agents: _Optional[_Iterable[_Union[Agent, _Mapping]]] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeregisterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
