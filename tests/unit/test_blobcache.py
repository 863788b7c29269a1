"""The client's blob cache (``neozodb.client.blobcache``): one download per
file even across processes, nothing partial left behind, pruning by least
recent use, and refusal of a directory that is not a blob cache."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from neozodb.client.blobcache import BlobCache, BlobCacheError

pytestmark = pytest.mark.timeout(60)

SRC = str(Path(__file__).resolve().parents[2] / 'src')
OID = (1234567).to_bytes(8, 'big')
TID = (0x03e0_0000_0000_0001).to_bytes(8, 'big')


def writer(content: bytes, calls: list):
    def download(f):
        calls.append(1)
        f.write(content)
    return download


def test_fetch_downloads_once_and_makes_the_file_read_only(tmp_path):
    cache = BlobCache(str(tmp_path / 'blobs'))
    calls: list = []
    name = cache.fetch(OID, TID, writer(b'x' * 5000, calls))
    assert cache.fetch(OID, TID, writer(b'other', calls)) == name
    assert cache.get(OID, TID) == name
    assert calls == [1]
    assert Path(name).read_bytes() == b'x' * 5000
    assert not stat.S_IMODE(os.stat(name).st_mode) & 0o222
    assert cache.get(OID, (5).to_bytes(8, 'big')) is None
    # ZEO's layout: oid % 997 directory, oid // 997 and the tid in the name
    assert name == str(tmp_path / 'blobs' / str(1234567 % 997) /
                       ('%d.%s.blob' % (1234567 // 997, TID.hex())))


def test_failed_download_leaves_nothing(tmp_path):
    cache = BlobCache(str(tmp_path / 'blobs'))

    def broken(f):
        f.write(b'partial')
        raise ConnectionError('storage gone')
    with pytest.raises(ConnectionError):
        cache.fetch(OID, TID, broken)
    directory = os.path.dirname(cache.filename(OID, TID))
    assert [n for n in os.listdir(directory) if n != '.lock'] == []
    calls: list = []
    assert Path(cache.fetch(OID, TID, writer(b'whole', calls))).read_bytes() == b'whole'


def _blocked_flock_waiter(pid: int) -> bool:
    """Whether process ``pid`` waits for an flock (``/proc/locks`` lists
    waiters after '->')."""
    with open('/proc/locks') as f:
        return any('->' in line and 'FLOCK' in line and line.split()[5] == str(pid)
                   for line in f)


def test_two_processes_fetching_one_file_download_it_once(tmp_path):
    """The first process's download is held open by a pipe until the
    second one is seen waiting for the lock: only the first downloads."""
    directory = str(tmp_path / 'blobs')
    BlobCache(directory)
    log = tmp_path / 'downloads'
    script = textwrap.dedent('''
        import sys
        from neozodb.client.blobcache import BlobCache
        directory, who, log, gate = sys.argv[1:]
        oid, tid = (%d).to_bytes(8, 'big'), bytes.fromhex(%r)
        def download(f):
            with open(log, 'a') as out:
                out.write(who)
            if gate != '-':
                with open(gate) as g:  # blocks until the test writes
                    g.read()
            f.write(who.encode() * 1000)
        name = BlobCache(directory).fetch(oid, tid, download)
        print(open(name, 'rb').read()[:1].decode())
    ''' % (int.from_bytes(OID, 'big'), TID.hex()))
    gate = tmp_path / 'gate'
    os.mkfifo(gate)
    env = dict(os.environ, PYTHONPATH=SRC)
    first = subprocess.Popen([sys.executable, '-c', script, directory, 'A', str(log), str(gate)],
                             stdout=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 30
    while not (log.exists() and log.read_text() == 'A'):
        assert time.monotonic() < deadline, 'first download did not start'
        time.sleep(0.01)  # polling another process's progress
    second = subprocess.Popen([sys.executable, '-c', script, directory, 'B', str(log), '-'],
                              stdout=subprocess.PIPE, text=True, env=env)
    while not _blocked_flock_waiter(second.pid):
        assert time.monotonic() < deadline and second.poll() is None, \
            'second process never waited for the lock'
        time.sleep(0.01)  # polling another process's progress
    with open(gate, 'w') as g:
        g.write('go')
    assert first.communicate(timeout=30)[0].strip() == 'A'
    assert second.communicate(timeout=30)[0].strip() == 'A'  # the first one's file
    assert log.read_text() == 'A'


def test_pruning_keeps_the_most_recently_used(tmp_path):
    # target 900 bytes; each 300-byte load (over 10 %) starts a pruning
    cache = BlobCache(str(tmp_path / 'blobs'), size=1000, size_check=10)
    base = time.time() - 1000
    names = []
    for i in range(3):
        names.append(cache.fetch(i.to_bytes(8, 'big'), TID, writer(b'a' * 300, [])))
        cache.wait_pruned(10)
        os.utime(names[-1], (base + i, base + i))  # oldest first
    assert all(os.path.exists(n) for n in names)  # 900: not over the target
    assert cache.get((0).to_bytes(8, 'big'), TID)  # a hit makes it the newest
    names.append(cache.fetch((3).to_bytes(8, 'big'), TID, writer(b'a' * 300, [])))
    cache.wait_pruned(10)
    assert [os.path.exists(n) for n in names] == [True, False, True, True]


def test_pruning_skips_a_directory_being_downloaded_into(tmp_path):
    # filled without a size, pruned by another object with one (as another
    # process would), whose own loads start no pruning
    old = BlobCache(str(tmp_path / 'blobs')).fetch(OID, TID, writer(b'o' * 500, []))
    cache = BlobCache(str(tmp_path / 'blobs'), size=100, size_check=10)
    removed = []

    def download(f):  # holds the lock of the directory of ``old``
        removed.append(cache.prune())
        f.write(b'n')
    BlobCache(str(tmp_path / 'blobs')).fetch(OID, (7).to_bytes(8, 'big'), download)
    assert removed == [0] and os.path.exists(old)
    assert cache.prune() == 500 and not os.path.exists(old)  # the older file


def test_add_moves_an_uncommitted_file_in(tmp_path):
    cache = BlobCache(str(tmp_path / 'blobs'))
    source = os.path.join(cache.temporary_directory(), 'upload')
    Path(source).write_bytes(b'new content')
    name = cache.add(OID, TID, source)
    assert not os.path.exists(source)
    assert Path(name).read_bytes() == b'new content'
    assert cache.get(OID, TID) == name


@pytest.mark.parametrize('layout', ['bushy', 'lawn', 'zeocache'])
def test_refuses_another_layout(tmp_path, layout):
    (tmp_path / '.layout').write_text(layout)
    with pytest.raises(BlobCacheError, match='layout'):
        BlobCache(str(tmp_path))


def test_refuses_a_directory_of_other_files(tmp_path):
    (tmp_path / 'Data.fs').write_bytes(b'FS21')
    with pytest.raises(BlobCacheError, match='not a blob cache'):
        BlobCache(str(tmp_path))


def test_bad_sizes(tmp_path):
    with pytest.raises(ValueError):
        BlobCache(str(tmp_path / 'a'), size=-1)
    with pytest.raises(ValueError):
        BlobCache(str(tmp_path / 'b'), size=10, size_check=100)
