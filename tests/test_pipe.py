"""Pipe: the tutorial's examples, stdlib semantics, large messages, passing ends around."""

from __future__ import annotations

import copy
import multiprocessing
import os
import pickle
import signal
import time

import numpy as np
import pytest
from _ipc_helpers import FORK, SPAWN, no_leaks, run_child  # noqa: F401
from conftest import wait_until

import procpool

pytestmark = pytest.mark.usefixtures("no_leaks")


def _tutorial_child(conn):
    conn.send([42, None, "hello"])
    conn.close()


@pytest.mark.parametrize("ctx", [FORK, SPAWN], ids=["fork", "spawn"])
def test_tutorial_pipe(ctx):
    parent_conn, child_conn = procpool.Pipe()
    p = ctx.Process(target=_tutorial_child, args=(child_conn,))
    p.start()
    assert parent_conn.poll(30)
    assert parent_conn.recv() == [42, None, "hello"]
    p.join(30)
    child_conn.close()
    with pytest.raises(EOFError):
        parent_conn.recv()  # the child closed its end, we closed our copy: nothing more
    parent_conn.close()


def _echo(conn):
    while True:
        msg = conn.recv()
        if msg == "STOP":
            return
        conn.send(msg)


def test_duplex_round_trips_any_object():
    a, b = procpool.Pipe()
    p = FORK.Process(target=_echo, args=(b,))
    p.start()
    b.close()
    for obj in (1, "x" * 100, {"k": [1, 2]}, b"", None, lambda x: x + 1):
        a.send(obj)
        back = a.recv()
        if callable(obj):
            assert back(1) == 2
        else:
            assert back == obj
    a.send("STOP")
    p.join(10)
    assert p.exitcode == 0


def test_one_way_pipe_directions():
    reader, writer = procpool.Pipe(duplex=False)
    assert reader.readable and not reader.writable
    assert writer.writable and not writer.readable
    with pytest.raises(OSError):
        reader.send(1)
    with pytest.raises(OSError):
        writer.recv()
    writer.send("ok")
    assert reader.recv() == "ok"


def test_bytes_api():
    a, b = procpool.Pipe()
    a.send_bytes(b"hello world", 6)
    assert b.recv_bytes() == b"world"
    a.send_bytes(b"hello world", 0, 5)
    buf = bytearray(10)
    assert b.recv_bytes_into(buf, 2) == 5 and buf[2:7] == b"hello"
    a.send_bytes(b"too long for it")
    with pytest.raises(multiprocessing.BufferTooShort) as info:
        b.recv_bytes_into(bytearray(3))
    assert info.value.args[0] == b"too long for it"
    a.send_bytes(b"")
    assert b.recv_bytes() == b""
    a.send_bytes(pickle.dumps({"mixed": True}))
    assert b.recv() == {"mixed": True}  # send_bytes of a pickle, recv() unpickles: as stdlib
    a.send(123)
    assert pickle.loads(b.recv_bytes()) == 123
    a.send_bytes(b"12345")
    with pytest.raises(OSError):
        b.recv_bytes(maxlength=2)
    with pytest.raises(ValueError):
        a.send_bytes(b"abc", 4)


def test_poll_timeout():
    a, b = procpool.Pipe()
    assert b.poll() is False
    assert b.poll(0.02) is False
    a.send(1)
    assert b.poll(None) is True
    assert b.recv() == 1


@pytest.mark.timeout(30)
def test_poll_without_waiting_sees_a_message_an_empty_message_and_eof():
    a, b = procpool.Pipe()
    a.send("hello")  # a Unix socket queues the datagram at the peer before send returns
    assert b.poll() is True  # the default timeout, 0: look once, do not wait
    assert b.poll(0) is True
    assert b.recv() == "hello"
    assert b.poll() is False
    a.send_bytes(b"")
    assert b.poll() is True  # an empty message is a message
    assert b.recv_bytes() == b""
    a.close()
    assert b.poll() is True  # EOF is there to read, as with multiprocessing
    with pytest.raises(EOFError):
        b.recv()
    b.close()


@pytest.mark.timeout(30)
def test_poll_accepts_a_huge_or_infinite_timeout():
    a, b = procpool.Pipe()
    a.send("there")
    assert b.poll(1e9) is True  # longer than poll() can wait in one call: not an error
    assert b.poll(float("inf")) is True
    a.close()
    b.close()


def test_send_to_closed_peer_raises_broken_pipe():
    a, b = procpool.Pipe()
    b.close()
    with pytest.raises(BrokenPipeError):
        a.send("anyone?")
    with pytest.raises(EOFError):
        a.recv()
    a.close()
    with pytest.raises(OSError):
        a.send(1)
    assert a.closed


def test_context_manager_closes():
    a, b = procpool.Pipe()
    with a, b:
        a.send(1)
        assert b.recv() == 1
    assert a.closed and b.closed


def _send_big(conn, payload):
    conn.send_bytes(payload)
    conn.send(np.frombuffer(payload, dtype=np.uint8))


def test_large_messages_out_of_band():
    payload = os.urandom(5 << 20)  # far above the socket buffer and the inline limit
    a, b = procpool.Pipe()
    p = FORK.Process(target=_send_big, args=(b, payload))
    p.start()
    assert a.recv_bytes() == payload
    arr = a.recv()
    assert arr.tobytes() == payload
    p.join(10)
    for size in (65535, 65536, 65537, 300_000):
        data = os.urandom(size)
        b.send_bytes(data)
        assert a.recv_bytes() == data
        b.send(data)
        assert a.recv() == data


def test_unpicklable_raises_at_send():
    a, b = procpool.Pipe()

    class Bad:
        def __reduce__(self):
            raise TypeError("no")

    with pytest.raises(procpool.SerializationError):
        a.send(Bad())
    assert not b.poll()


def _reply_through(conn_holder):
    inner = conn_holder.recv()
    inner.send("through a passed end")


def test_connection_passes_through_a_pipe_and_to_pools():
    outer_a, outer_b = procpool.Pipe()
    inner_a, inner_b = procpool.Pipe()
    p = FORK.Process(target=_reply_through, args=(outer_b,))
    p.start()
    outer_a.send(inner_b)  # a Connection inside a message: its descriptor travels
    assert inner_a.recv() == "through a passed end"
    p.join(10)
    with procpool.Pool(1) as pool:
        pool.apply_async(_send_one, (inner_b,)).get(20)
    assert inner_a.recv() == "from the pool"
    with multiprocessing.get_context("fork").Pool(1) as pool:
        pool.apply_async(_send_one, (inner_b,)).get(20)
    assert inner_a.recv() == "from the pool"


def _send_one(conn):
    conn.send("from the pool")


def _kill_self_mid_stream(conn):
    for i in range(1000):
        conn.send(i)
    os.kill(os.getpid(), signal.SIGKILL)


def test_sender_killed_leaves_whole_messages_then_eof():
    a, b = procpool.Pipe()
    assert run_child(_kill_self_mid_stream, b) == -signal.SIGKILL
    b.close()
    got = []
    while True:
        try:
            got.append(a.recv())
        except EOFError:
            break
    assert got == list(range(1000))


@pytest.mark.parametrize("lib", [multiprocessing, procpool], ids=["multiprocessing", "procpool"])
def test_bytes_api_details_as_multiprocessing(lib):
    import array

    a, b = lib.Pipe()
    # recv_bytes_into counts bytes, whatever the buffer's item size
    a.send_bytes(b"12345678")
    assert b.recv_bytes_into(array.array("i", [0] * 4)) == 8
    a.send_bytes(b"123456")
    assert b.recv_bytes_into(array.array("i", [0] * 4), 4) == 6
    # send() then recv_bytes(): the pickle, at any size (procpool sends big bytes raw)
    for size in (100, 200_000):
        payload = os.urandom(size)
        a.send(payload)
        assert pickle.loads(b.recv_bytes()) == payload
    # a message longer than maxlength is lost; a duplex end can still send
    a.send_bytes(b"x" * 100)
    with pytest.raises(OSError, match="bad message length"):
        b.recv_bytes(10)
    b.send("still here")
    assert a.recv() == "still here"
    with pytest.raises(OSError):
        b.recv_bytes()
    a.close()
    b.close()


@pytest.mark.timeout(60)
def test_a_send_on_a_full_socket_goes_as_soon_as_one_message_has_left():
    # a sender waiting for the socket to say it is writable (three-quarters empty) waited for
    # good on a peer that took a few messages and then waited for an answer
    import socket
    import threading

    a, b = procpool.Pipe()
    filled = 0
    sock = b._wire.sock
    while True:  # (fill the buffer with whole pickled messages, as send does)
        try:
            sock.send(pickle.dumps(filled), socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        filled += 1
    sent = threading.Event()
    sender = threading.Thread(target=lambda: (b.send("one more"), sent.set()), daemon=True)
    sender.start()
    for i in range(10):
        assert a.recv() == i
    assert sent.wait(5), "send waited although a message fits"
    sender.join(5)
    for i in range(10, filled):
        assert a.recv() == i
    assert a.recv() == "one more"
    a.close()
    b.close()


@pytest.mark.timeout(60)
def test_a_send_waiting_on_a_full_socket_gets_broken_pipe_when_the_peer_closes():
    # the kernel says ECONNRESET when the peer closed with messages unread: the same error
    # as a send to a closed peer with none (BrokenPipeError), as documented
    import socket
    import threading

    a, b = procpool.Pipe()
    sock = b._wire.sock
    while True:
        try:
            sock.send(pickle.dumps(0), socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
    errors: list = []

    def send_one_more():
        try:
            b.send("one more")
        except Exception as exc:
            errors.append(exc)

    sender = threading.Thread(target=send_one_more)
    sender.start()
    time.sleep(0.2)
    a.close()
    sender.join(10)
    assert not sender.is_alive() and len(errors) == 1
    assert isinstance(errors[0], BrokenPipeError), repr(errors[0])
    with pytest.raises(BrokenPipeError):
        b.send("after")
    b.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["bytes", "numpy"])
def test_a_sender_ahead_of_its_reader_waits_once_its_large_messages_fill_the_bound(
    monkeypatch, kind
):
    # A large message travels as a memfd and its datagram is small: the socket's buffer never
    # filled, and a sender ahead of a reader that slept held unbounded shared memory (1.2 GB
    # in 2 s of 1 MiB sends).  Now it waits once PIPE_BULK_IN_FLIGHT bytes are untaken.
    import threading

    from procpool import _ipc_wire

    # four 1 MiB messages and their pickles fit, a fifth does not
    monkeypatch.setattr(_ipc_wire, "PIPE_BULK_IN_FLIGHT", (4 << 20) + (64 << 10))
    a, b = procpool.Pipe()
    # (a numpy array's buffer is an out-of-band memfd beside a small pickle: it counts too)
    if kind == "bytes":
        messages: list = [bytes([i]) * (1 << 20) for i in range(12)]
    else:
        messages = [np.full(1 << 20, i, np.uint8) for i in range(12)]
    sent: list[int] = []

    def send_all():
        for i, message in enumerate(messages):
            b.send(message)
            sent.append(i)

    sender = threading.Thread(target=send_all, daemon=True)
    sender.start()
    assert wait_until(lambda: len(sent) >= 4, timeout=10)
    time.sleep(0.3)  # (nothing to wait on: a sender that does not wait sends the rest now)
    assert len(sent) == 4, f"{len(sent)} MiB sent to a reader that took none"
    for message in messages:  # all of it, whole and in order, once the reader reads
        got = a.recv()
        assert (got == message).all() if kind == "numpy" else got == message
    sender.join(10)
    assert not sender.is_alive() and len(sent) == 12
    a.close()
    b.close()


@pytest.mark.timeout(60)
def test_a_sender_at_its_bound_is_not_held_up_by_another_process_sending_on_its_end(monkeypatch):
    # "taken" was the kernel's count of untaken datagrams falling to 0: a child sending small
    # messages steadily on its copy of the end kept it above 0, and the parent, at its bound,
    # waited until the child stopped (10 s in the review), though the reader had taken its own
    import threading

    from procpool import _ipc_wire

    monkeypatch.setattr(_ipc_wire, "PIPE_BULK_IN_FLIGHT", (4 << 20) + (64 << 10))
    reader_end, sender_end = procpool.Pipe()
    pid = os.fork()
    if pid == 0:  # small messages, a little faster than the reader takes them, for 20 s
        try:
            reader_end.close()
            end = time.monotonic() + 20
            while time.monotonic() < end:
                sender_end.send(("child", b"c" * 4000))
        finally:
            os._exit(0)
    taken: list[int] = []

    def read_until_the_parents_eight():
        while len(taken) < 8:
            kind, value = reader_end.recv()
            if kind == "parent":
                taken.append(value[0])
            time.sleep(0.0001)

    reader = threading.Thread(target=read_until_the_parents_eight, daemon=True)
    reader.start()
    try:
        started = time.monotonic()
        for i in range(8):  # twice the bound: the last four wait for the reader to take some
            sender_end.send(("parent", (i, b"p" * (1 << 20))))
        elapsed = time.monotonic() - started
        reader.join(15)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert taken == list(range(8))
    assert elapsed < 10, f"the parent's sends took {elapsed:.1f} s"
    reader_end.close()
    sender_end.close()


def test_a_message_over_the_descriptor_limit_raises_serialization_error_and_sends_nothing():
    # a message over 64 KiB takes one descriptor more (its memfd): past 250 it raised a bare
    # ValueError, where the docs say SerializationError
    ends = [procpool.Pipe() for _ in range(125)]
    conns = [c for pair in ends for c in pair]
    a, b = procpool.Pipe()
    q = procpool.Queue()
    try:
        for send in (b.send, q.put):
            with pytest.raises(procpool.SerializationError, match="at most 250 descriptors"):
                send((b"x" * 200_000, conns))
        assert not a.poll(0) and q.empty()
        b.send("still works")
        q.put("still works")
        assert a.recv() == q.get(timeout=5) == "still works"
    finally:
        for c in [*conns, a, b]:
            c.close()
        q.close()


def test_bytes_of_a_multidimensional_buffer_count_bytes():
    # offset and size counted rows of a 2-D uint8 array (its first dimension), and a large
    # numpy array sent with send() could not be read with recv_bytes() (review)
    a, b = procpool.Pipe()
    img = np.arange(12, dtype=np.uint8).reshape(3, 4)
    a.send_bytes(img, 1, 2)
    assert b.recv_bytes() == b"\x01\x02"
    a.send_bytes(img, 5)
    assert b.recv_bytes() == bytes(range(5, 12))
    a.send_bytes(b"123456")
    assert b.recv_bytes_into(np.zeros((2, 4), np.uint8)) == 6  # (8 bytes: room)
    big = np.arange(100_000, dtype=np.float64)  # (its buffer travels through shared memory)
    a.send(big)
    assert np.array_equal(pickle.loads(b.recv_bytes()), big)
    a.send("next")
    assert b.recv() == "next"
    a.close()
    b.close()


def _send_through(conn, text):
    conn.send(text)
    return conn.fileno() >= 0


def test_stdlib_connections_and_sockets_travel_as_working_copies():
    # a multiprocessing Connection went as its descriptor's number (pointing at nothing in
    # another process, and dropping the copy closed the original); a socket was refused
    import socket

    q = procpool.Queue()
    r, w = multiprocessing.Pipe()  # (its module is imported after the queue was made)
    q.put(w)
    w2 = q.get()
    assert w2.fileno() != w.fileno()
    w2.send("through the queue")
    del w2
    w.send("the original still works")
    assert [r.recv(), r.recv()] == ["through the queue", "the original still works"]
    with procpool.Pool(1) as pool:
        assert pool.apply(_send_through, (w, "from a task"))
    assert r.recv() == "from a task"
    a, b = procpool.Pipe()
    s1, s2 = socket.socketpair()
    a.send(s1)
    got = b.recv()
    got.sendall(b"hi")
    assert s2.recv(10) == b"hi"
    with pytest.raises(TypeError, match="cannot pickle 'Connection'"):
        pickle.dumps(w)  # (the stdlib wrote the number; a socket: TypeError, as ever)
    with pytest.raises(TypeError, match="cannot pickle 'socket'"):
        copy.deepcopy({"s": s1})
    for obj in (r, w, a, b, s1, s2, got):
        obj.close()
    q.close()
