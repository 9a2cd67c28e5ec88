from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoadModuleRequest(_message.Message):
    __slots__ = ("code", "name")
    CODE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    code: bytes
    name: str
    def __init__(self, code: _Optional[bytes] = ..., name: _Optional[str] = ...) -> None: ...

class Module(_message.Message):
    __slots__ = ("id", "name", "size", "functions", "helpers", "instruction_count")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    HELPERS_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_COUNT_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    size: int
    functions: _containers.RepeatedCompositeFieldContainer[Function]
    helpers: _containers.RepeatedCompositeFieldContainer[Helper]
    instruction_count: int
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., size: _Optional[int] = ..., functions: _Optional[_Iterable[_Union[Function, _Mapping]]] = ..., helpers: _Optional[_Iterable[_Union[Helper, _Mapping]]] = ..., instruction_count: _Optional[int] = ...) -> None: ...

class Function(_message.Message):
    __slots__ = ("name", "pc", "size", "exported")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PC_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    EXPORTED_FIELD_NUMBER: _ClassVar[int]
    name: str
    pc: int
    size: int
    exported: bool
    def __init__(self, name: _Optional[str] = ..., pc: _Optional[int] = ..., size: _Optional[int] = ..., exported: _Optional[bool] = ...) -> None: ...

class Helper(_message.Message):
    __slots__ = ("number", "name", "has_number", "in_process", "description", "cost")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    HAS_NUMBER_FIELD_NUMBER: _ClassVar[int]
    IN_PROCESS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    number: int
    name: str
    has_number: bool
    in_process: bool
    description: str
    cost: int
    def __init__(self, number: _Optional[int] = ..., name: _Optional[str] = ..., has_number: _Optional[bool] = ..., in_process: _Optional[bool] = ..., description: _Optional[str] = ..., cost: _Optional[int] = ...) -> None: ...

class GetModuleRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListModulesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModulesResponse(_message.Message):
    __slots__ = ("modules",)
    MODULES_FIELD_NUMBER: _ClassVar[int]
    modules: _containers.RepeatedCompositeFieldContainer[Module]
    def __init__(self, modules: _Optional[_Iterable[_Union[Module, _Mapping]]] = ...) -> None: ...

class DeleteModuleRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteModuleResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListHelpersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListHelpersResponse(_message.Message):
    __slots__ = ("helpers",)
    HELPERS_FIELD_NUMBER: _ClassVar[int]
    helpers: _containers.RepeatedCompositeFieldContainer[Helper]
    def __init__(self, helpers: _Optional[_Iterable[_Union[Helper, _Mapping]]] = ...) -> None: ...

class Argument(_message.Message):
    __slots__ = ("value", "buffer")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    BUFFER_FIELD_NUMBER: _ClassVar[int]
    value: int
    buffer: bytes
    def __init__(self, value: _Optional[int] = ..., buffer: _Optional[bytes] = ...) -> None: ...

class ExecuteRequest(_message.Message):
    __slots__ = ("module_id", "function", "args", "fuel", "state", "dump_maps")
    MODULE_ID_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    FUEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DUMP_MAPS_FIELD_NUMBER: _ClassVar[int]
    module_id: str
    function: str
    args: _containers.RepeatedCompositeFieldContainer[Argument]
    fuel: int
    state: str
    dump_maps: bool
    def __init__(self, module_id: _Optional[str] = ..., function: _Optional[str] = ..., args: _Optional[_Iterable[_Union[Argument, _Mapping]]] = ..., fuel: _Optional[int] = ..., state: _Optional[str] = ..., dump_maps: _Optional[bool] = ...) -> None: ...

class ExecuteResponse(_message.Message):
    __slots__ = ("return_value", "fuel_used", "trap", "log", "buffers", "duration_ns", "maps", "events", "ring_buffer")
    class MapsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: MapDump
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[MapDump, _Mapping]] = ...) -> None: ...
    RETURN_VALUE_FIELD_NUMBER: _ClassVar[int]
    FUEL_USED_FIELD_NUMBER: _ClassVar[int]
    TRAP_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    DURATION_NS_FIELD_NUMBER: _ClassVar[int]
    MAPS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    RING_BUFFER_FIELD_NUMBER: _ClassVar[int]
    return_value: int
    fuel_used: int
    trap: Trap
    log: _containers.RepeatedScalarFieldContainer[str]
    buffers: _containers.RepeatedScalarFieldContainer[bytes]
    duration_ns: int
    maps: _containers.MessageMap[str, MapDump]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    ring_buffer: bool
    def __init__(self, return_value: _Optional[int] = ..., fuel_used: _Optional[int] = ..., trap: _Optional[_Union[Trap, _Mapping]] = ..., log: _Optional[_Iterable[str]] = ..., buffers: _Optional[_Iterable[bytes]] = ..., duration_ns: _Optional[int] = ..., maps: _Optional[_Mapping[str, MapDump]] = ..., events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., ring_buffer: _Optional[bool] = ...) -> None: ...

class MapDump(_message.Message):
    __slots__ = ("type", "key_size", "value_size", "max_entries", "entries")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    KEY_SIZE_FIELD_NUMBER: _ClassVar[int]
    VALUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    type: str
    key_size: int
    value_size: int
    max_entries: int
    entries: _containers.RepeatedCompositeFieldContainer[MapEntry]
    def __init__(self, type: _Optional[str] = ..., key_size: _Optional[int] = ..., value_size: _Optional[int] = ..., max_entries: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[MapEntry, _Mapping]]] = ...) -> None: ...

class MapEntry(_message.Message):
    __slots__ = ("key", "value")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    value: bytes
    def __init__(self, key: _Optional[bytes] = ..., value: _Optional[bytes] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("map", "data")
    MAP_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    map: str
    data: bytes
    def __init__(self, map: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class Trap(_message.Message):
    __slots__ = ("kind", "pc", "instruction", "location", "message", "function")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PC_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    kind: str
    pc: int
    instruction: str
    location: str
    message: str
    function: str
    def __init__(self, kind: _Optional[str] = ..., pc: _Optional[int] = ..., instruction: _Optional[str] = ..., location: _Optional[str] = ..., message: _Optional[str] = ..., function: _Optional[str] = ...) -> None: ...

class ExecuteStreamRequest(_message.Message):
    __slots__ = ("start", "helper_result", "memory_read", "memory_write", "log")
    START_FIELD_NUMBER: _ClassVar[int]
    HELPER_RESULT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_READ_FIELD_NUMBER: _ClassVar[int]
    MEMORY_WRITE_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    start: ExecuteStart
    helper_result: HelperResult
    memory_read: MemoryRead
    memory_write: MemoryWrite
    log: HelperLog
    def __init__(self, start: _Optional[_Union[ExecuteStart, _Mapping]] = ..., helper_result: _Optional[_Union[HelperResult, _Mapping]] = ..., memory_read: _Optional[_Union[MemoryRead, _Mapping]] = ..., memory_write: _Optional[_Union[MemoryWrite, _Mapping]] = ..., log: _Optional[_Union[HelperLog, _Mapping]] = ...) -> None: ...

class ExecuteStreamResponse(_message.Message):
    __slots__ = ("helper_call", "memory_read_result", "memory_write_result", "result", "event")
    HELPER_CALL_FIELD_NUMBER: _ClassVar[int]
    MEMORY_READ_RESULT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_WRITE_RESULT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    helper_call: HelperCall
    memory_read_result: MemoryReadResult
    memory_write_result: MemoryWriteResult
    result: ExecuteResponse
    event: Event
    def __init__(self, helper_call: _Optional[_Union[HelperCall, _Mapping]] = ..., memory_read_result: _Optional[_Union[MemoryReadResult, _Mapping]] = ..., memory_write_result: _Optional[_Union[MemoryWriteResult, _Mapping]] = ..., result: _Optional[_Union[ExecuteResponse, _Mapping]] = ..., event: _Optional[_Union[Event, _Mapping]] = ...) -> None: ...

class ExecuteStart(_message.Message):
    __slots__ = ("request", "helper_numbers", "helper_names")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    HELPER_NUMBERS_FIELD_NUMBER: _ClassVar[int]
    HELPER_NAMES_FIELD_NUMBER: _ClassVar[int]
    request: ExecuteRequest
    helper_numbers: _containers.RepeatedScalarFieldContainer[int]
    helper_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request: _Optional[_Union[ExecuteRequest, _Mapping]] = ..., helper_numbers: _Optional[_Iterable[int]] = ..., helper_names: _Optional[_Iterable[str]] = ...) -> None: ...

class HelperCall(_message.Message):
    __slots__ = ("call_id", "number", "name", "args")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    number: int
    name: str
    args: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, call_id: _Optional[int] = ..., number: _Optional[int] = ..., name: _Optional[str] = ..., args: _Optional[_Iterable[int]] = ...) -> None: ...

class HelperResult(_message.Message):
    __slots__ = ("call_id", "value", "error")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    value: int
    error: str
    def __init__(self, call_id: _Optional[int] = ..., value: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class MemoryRead(_message.Message):
    __slots__ = ("call_id", "address", "size", "until_nul")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_NUL_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    address: int
    size: int
    until_nul: bool
    def __init__(self, call_id: _Optional[int] = ..., address: _Optional[int] = ..., size: _Optional[int] = ..., until_nul: _Optional[bool] = ...) -> None: ...

class HelperLog(_message.Message):
    __slots__ = ("call_id", "text")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    text: str
    def __init__(self, call_id: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class MemoryWrite(_message.Message):
    __slots__ = ("call_id", "address", "data")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    address: int
    data: bytes
    def __init__(self, call_id: _Optional[int] = ..., address: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class MemoryReadResult(_message.Message):
    __slots__ = ("call_id", "data", "error")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    data: bytes
    error: str
    def __init__(self, call_id: _Optional[int] = ..., data: _Optional[bytes] = ..., error: _Optional[str] = ...) -> None: ...

class MemoryWriteResult(_message.Message):
    __slots__ = ("call_id", "error")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    error: str
    def __init__(self, call_id: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class BatchHeader(_message.Message):
    __slots__ = ("module_id", "function", "fuel", "state", "helper_numbers", "helper_names")
    MODULE_ID_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    FUEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    HELPER_NUMBERS_FIELD_NUMBER: _ClassVar[int]
    HELPER_NAMES_FIELD_NUMBER: _ClassVar[int]
    module_id: str
    function: str
    fuel: int
    state: str
    helper_numbers: _containers.RepeatedScalarFieldContainer[int]
    helper_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, module_id: _Optional[str] = ..., function: _Optional[str] = ..., fuel: _Optional[int] = ..., state: _Optional[str] = ..., helper_numbers: _Optional[_Iterable[int]] = ..., helper_names: _Optional[_Iterable[str]] = ...) -> None: ...

class BatchInput(_message.Message):
    __slots__ = ("args",)
    ARGS_FIELD_NUMBER: _ClassVar[int]
    args: _containers.RepeatedCompositeFieldContainer[Argument]
    def __init__(self, args: _Optional[_Iterable[_Union[Argument, _Mapping]]] = ...) -> None: ...

class ExecuteBatchRequest(_message.Message):
    __slots__ = ("header", "inputs", "packed", "end_of_inputs", "helper_result", "memory_read", "memory_write", "log")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    END_OF_INPUTS_FIELD_NUMBER: _ClassVar[int]
    HELPER_RESULT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_READ_FIELD_NUMBER: _ClassVar[int]
    MEMORY_WRITE_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    header: BatchHeader
    inputs: _containers.RepeatedCompositeFieldContainer[BatchInput]
    packed: PackedInputs
    end_of_inputs: bool
    helper_result: HelperResult
    memory_read: MemoryRead
    memory_write: MemoryWrite
    log: HelperLog
    def __init__(self, header: _Optional[_Union[BatchHeader, _Mapping]] = ..., inputs: _Optional[_Iterable[_Union[BatchInput, _Mapping]]] = ..., packed: _Optional[_Union[PackedInputs, _Mapping]] = ..., end_of_inputs: _Optional[bool] = ..., helper_result: _Optional[_Union[HelperResult, _Mapping]] = ..., memory_read: _Optional[_Union[MemoryRead, _Mapping]] = ..., memory_write: _Optional[_Union[MemoryWrite, _Mapping]] = ..., log: _Optional[_Union[HelperLog, _Mapping]] = ...) -> None: ...

class PackedInputs(_message.Message):
    __slots__ = ("words",)
    WORDS_FIELD_NUMBER: _ClassVar[int]
    words: bytes
    def __init__(self, words: _Optional[bytes] = ...) -> None: ...

class BatchResult(_message.Message):
    __slots__ = ("return_value", "fuel_used", "trap", "buffers", "log")
    RETURN_VALUE_FIELD_NUMBER: _ClassVar[int]
    FUEL_USED_FIELD_NUMBER: _ClassVar[int]
    TRAP_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    return_value: int
    fuel_used: int
    trap: Trap
    buffers: _containers.RepeatedScalarFieldContainer[bytes]
    log: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, return_value: _Optional[int] = ..., fuel_used: _Optional[int] = ..., trap: _Optional[_Union[Trap, _Mapping]] = ..., buffers: _Optional[_Iterable[bytes]] = ..., log: _Optional[_Iterable[str]] = ...) -> None: ...

class ExecuteBatchResponse(_message.Message):
    __slots__ = ("results", "done", "packed", "helper_call", "memory_read_result", "memory_write_result")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    HELPER_CALL_FIELD_NUMBER: _ClassVar[int]
    MEMORY_READ_RESULT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_WRITE_RESULT_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchResult]
    done: bool
    packed: PackedResults
    helper_call: HelperCall
    memory_read_result: MemoryReadResult
    memory_write_result: MemoryWriteResult
    def __init__(self, results: _Optional[_Iterable[_Union[BatchResult, _Mapping]]] = ..., done: _Optional[bool] = ..., packed: _Optional[_Union[PackedResults, _Mapping]] = ..., helper_call: _Optional[_Union[HelperCall, _Mapping]] = ..., memory_read_result: _Optional[_Union[MemoryReadResult, _Mapping]] = ..., memory_write_result: _Optional[_Union[MemoryWriteResult, _Mapping]] = ...) -> None: ...

class PackedResults(_message.Message):
    __slots__ = ("words", "traps", "logs")
    WORDS_FIELD_NUMBER: _ClassVar[int]
    TRAPS_FIELD_NUMBER: _ClassVar[int]
    LOGS_FIELD_NUMBER: _ClassVar[int]
    words: bytes
    traps: _containers.RepeatedCompositeFieldContainer[Trap]
    logs: _containers.RepeatedCompositeFieldContainer[PackedLog]
    def __init__(self, words: _Optional[bytes] = ..., traps: _Optional[_Iterable[_Union[Trap, _Mapping]]] = ..., logs: _Optional[_Iterable[_Union[PackedLog, _Mapping]]] = ...) -> None: ...

class PackedLog(_message.Message):
    __slots__ = ("index", "lines")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    index: int
    lines: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, index: _Optional[int] = ..., lines: _Optional[_Iterable[str]] = ...) -> None: ...

class TestRunHeader(_message.Message):
    __slots__ = ("module_id", "program", "fuel", "state", "repeat", "dump_maps")
    MODULE_ID_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_FIELD_NUMBER: _ClassVar[int]
    FUEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REPEAT_FIELD_NUMBER: _ClassVar[int]
    DUMP_MAPS_FIELD_NUMBER: _ClassVar[int]
    module_id: str
    program: str
    fuel: int
    state: str
    repeat: int
    dump_maps: bool
    def __init__(self, module_id: _Optional[str] = ..., program: _Optional[str] = ..., fuel: _Optional[int] = ..., state: _Optional[str] = ..., repeat: _Optional[int] = ..., dump_maps: _Optional[bool] = ...) -> None: ...

class TestRunRequest(_message.Message):
    __slots__ = ("header", "packets")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PACKETS_FIELD_NUMBER: _ClassVar[int]
    header: TestRunHeader
    packets: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, header: _Optional[_Union[TestRunHeader, _Mapping]] = ..., packets: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ContextField(_message.Message):
    __slots__ = ("name", "scalar", "array")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCALAR_FIELD_NUMBER: _ClassVar[int]
    ARRAY_FIELD_NUMBER: _ClassVar[int]
    name: str
    scalar: int
    array: ContextArray
    def __init__(self, name: _Optional[str] = ..., scalar: _Optional[int] = ..., array: _Optional[_Union[ContextArray, _Mapping]] = ...) -> None: ...

class ContextArray(_message.Message):
    __slots__ = ("elements",)
    ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    elements: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, elements: _Optional[_Iterable[int]] = ...) -> None: ...

class Redirect(_message.Message):
    __slots__ = ("ifindex", "ingress")
    IFINDEX_FIELD_NUMBER: _ClassVar[int]
    INGRESS_FIELD_NUMBER: _ClassVar[int]
    ifindex: int
    ingress: bool
    def __init__(self, ifindex: _Optional[int] = ..., ingress: _Optional[bool] = ...) -> None: ...

class PacketResult(_message.Message):
    __slots__ = ("retval", "verdict", "data", "context", "fuel_used", "duration_ns", "trap", "log", "redirect")
    RETVAL_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    FUEL_USED_FIELD_NUMBER: _ClassVar[int]
    DURATION_NS_FIELD_NUMBER: _ClassVar[int]
    TRAP_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    REDIRECT_FIELD_NUMBER: _ClassVar[int]
    retval: int
    verdict: str
    data: bytes
    context: _containers.RepeatedCompositeFieldContainer[ContextField]
    fuel_used: int
    duration_ns: int
    trap: Trap
    log: _containers.RepeatedScalarFieldContainer[str]
    redirect: Redirect
    def __init__(self, retval: _Optional[int] = ..., verdict: _Optional[str] = ..., data: _Optional[bytes] = ..., context: _Optional[_Iterable[_Union[ContextField, _Mapping]]] = ..., fuel_used: _Optional[int] = ..., duration_ns: _Optional[int] = ..., trap: _Optional[_Union[Trap, _Mapping]] = ..., log: _Optional[_Iterable[str]] = ..., redirect: _Optional[_Union[Redirect, _Mapping]] = ...) -> None: ...

class TestRunResponse(_message.Message):
    __slots__ = ("program_type", "results", "done", "maps")
    class MapsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: MapDump
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[MapDump, _Mapping]] = ...) -> None: ...
    PROGRAM_TYPE_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    MAPS_FIELD_NUMBER: _ClassVar[int]
    program_type: str
    results: _containers.RepeatedCompositeFieldContainer[PacketResult]
    done: bool
    maps: _containers.MessageMap[str, MapDump]
    def __init__(self, program_type: _Optional[str] = ..., results: _Optional[_Iterable[_Union[PacketResult, _Mapping]]] = ..., done: _Optional[bool] = ..., maps: _Optional[_Mapping[str, MapDump]] = ...) -> None: ...

class State(_message.Message):
    __slots__ = ("name", "module_id", "map_bytes", "maps")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODULE_ID_FIELD_NUMBER: _ClassVar[int]
    MAP_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    module_id: str
    map_bytes: int
    maps: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., module_id: _Optional[str] = ..., map_bytes: _Optional[int] = ..., maps: _Optional[_Iterable[str]] = ...) -> None: ...

class ListStatesRequest(_message.Message):
    __slots__ = ("module_id",)
    MODULE_ID_FIELD_NUMBER: _ClassVar[int]
    module_id: str
    def __init__(self, module_id: _Optional[str] = ...) -> None: ...

class ListStatesResponse(_message.Message):
    __slots__ = ("states",)
    STATES_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedCompositeFieldContainer[State]
    def __init__(self, states: _Optional[_Iterable[_Union[State, _Mapping]]] = ...) -> None: ...

class GetStateRequest(_message.Message):
    __slots__ = ("module_id", "state", "map")
    MODULE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    module_id: str
    state: str
    map: str
    def __init__(self, module_id: _Optional[str] = ..., state: _Optional[str] = ..., map: _Optional[str] = ...) -> None: ...

class GetStateResponse(_message.Message):
    __slots__ = ("state", "maps")
    class MapsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: MapDump
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[MapDump, _Mapping]] = ...) -> None: ...
    STATE_FIELD_NUMBER: _ClassVar[int]
    MAPS_FIELD_NUMBER: _ClassVar[int]
    state: State
    maps: _containers.MessageMap[str, MapDump]
    def __init__(self, state: _Optional[_Union[State, _Mapping]] = ..., maps: _Optional[_Mapping[str, MapDump]] = ...) -> None: ...

class UpdateStateEntriesRequest(_message.Message):
    __slots__ = ("module_id", "state", "map", "entries", "flags")
    MODULE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    module_id: str
    state: str
    map: str
    entries: _containers.RepeatedCompositeFieldContainer[MapEntry]
    flags: int
    def __init__(self, module_id: _Optional[str] = ..., state: _Optional[str] = ..., map: _Optional[str] = ..., entries: _Optional[_Iterable[_Union[MapEntry, _Mapping]]] = ..., flags: _Optional[int] = ...) -> None: ...

class UpdateStateEntriesResponse(_message.Message):
    __slots__ = ("results", "created")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedScalarFieldContainer[int]
    created: bool
    def __init__(self, results: _Optional[_Iterable[int]] = ..., created: _Optional[bool] = ...) -> None: ...

class DeleteStateEntriesRequest(_message.Message):
    __slots__ = ("module_id", "state", "map", "keys")
    MODULE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    module_id: str
    state: str
    map: str
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, module_id: _Optional[str] = ..., state: _Optional[str] = ..., map: _Optional[str] = ..., keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class DeleteStateEntriesResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, results: _Optional[_Iterable[int]] = ...) -> None: ...

class DeleteStateRequest(_message.Message):
    __slots__ = ("module_id", "state")
    MODULE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    module_id: str
    state: str
    def __init__(self, module_id: _Optional[str] = ..., state: _Optional[str] = ...) -> None: ...

class DeleteStateResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
