import numpy as np

Buffer = np.ndarray | bytes | bytearray | memoryview

def copy_blocks(
    outer: Buffer,
    ids: Buffer,
    num_blocks: int,
    stride: int,
    plane_bytes: int,
    chunk: Buffer,
    chunk_blocks: int,
    first: int,
    to_engine: bool,
    threads: int = 1,
) -> int: ...
def install() -> None: ...
def _tune(stream_min_bytes: int = ..., part_min_bytes: int = ...) -> tuple[int, int]: ...
