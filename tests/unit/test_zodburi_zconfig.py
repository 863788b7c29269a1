"""Client configuration: neo:// zodburi URIs and the <NEOStorage> ZConfig section."""

import io

import pytest
import ZConfig
import ZODB.config
import zodburi
from ZODB.MappingStorage import MappingStorage

import neozodb.client
from neozodb.client.zconfig import (
    NEOStorageConfig,
    convert_bool,
    convert_bytesize,
    convert_compress,
)
from neozodb.client.zodburi import NEOStorageFactory, parse_uri, resolve_uri

pytestmark = pytest.mark.timeout(60)

SNIPPET = """\
%import {package}
<zodb>
 <NEOStorage>
  master_nodes 127.0.0.1:10000
  name test
 </NEOStorage>
</zodb>
"""


@pytest.fixture
def fake_storage(monkeypatch):
    """Replace neozodb.client.Storage by a recorder returning a MappingStorage."""
    calls = []

    def Storage(**kw):
        calls.append(kw)
        return MappingStorage(kw.get("name", "fake"))

    monkeypatch.setattr(neozodb.client, "Storage", Storage, raising=False)
    return calls


# -- value converters ---------------------------------------------------------


def test_converters():
    for word in ("true", "1", "YES", "on", "True"):
        assert convert_bool(word) is True
    for word in ("false", "0", "no", "OFF"):
        assert convert_bool(word) is False
    with pytest.raises(ValueError):
        convert_bool("maybe")
    assert convert_compress("true") is True
    assert convert_compress("0") is False
    assert convert_compress("zlib") == "zlib"
    assert convert_compress("zlib=9") == "zlib=9"
    with pytest.raises(ValueError):
        convert_compress("lz4")
    assert convert_bytesize("20MB") == 20 << 20
    assert convert_bytesize("512KB") == 512 << 10
    assert convert_bytesize("1gb") == 1 << 30
    assert convert_bytesize("123") == 123
    assert convert_bytesize(7) == 7
    for bad in ("", "MB", "1.5MB", "-1", "10TB"):
        with pytest.raises(ValueError):
            convert_bytesize(bad)


# -- zodburi ------------------------------------------------------------------


def test_uri_two_masters_and_options():
    kwargs, dbkw = parse_uri(
        "neo://mycluster@127.0.0.1:10000,10.0.0.2:10001"
        "?read-only=true&compress=false&cache_size=30MB&read-ahead=8&logfile=/tmp/c.log&server-sync=no"
        "&ignore-wrong-checksum=yes&pack_gc=off&connect_timeout=2.5"
        "&blob-dir=/srv/blobs&blob_cache_size=1GB&blob_cache_size_check=5"
        "&database_name=main&connection_pool_size=3&cache_size_bytes=1MB&pool_timeout=9"
    )
    assert kwargs == {
        "master_nodes": "127.0.0.1:10000 10.0.0.2:10001",
        "name": "mycluster",
        "read_only": True,
        "compress": False,
        "cache_size": 30 << 20,
        "read_ahead": 8,
        "server_sync": False,
        "logfile": "/tmp/c.log",
        "ignore_wrong_checksum": True,
        "pack_gc": False,
        "connect_timeout": 2.5,
        "blob_dir": "/srv/blobs",
        "blob_cache_size": 1 << 30,
        "blob_cache_size_check": 5,
    }
    assert dbkw == {
        "database_name": "main",
        "connection_pool_size": 3,
        "connection_cache_size_bytes": 1 << 20,
        "connection_pool_timeout": 9,
    }


def test_uri_minimal_and_ipv6():
    factory, dbkw = resolve_uri("neo://test@[::1]:10000")
    assert isinstance(factory, NEOStorageFactory)
    assert factory.kwargs == {"master_nodes": "[::1]:10000", "name": "test"}
    assert dbkw == {}
    kwargs, _ = parse_uri("neo://te%20st@h:1,[2001:db8::1]:2/?compress=zlib=6")
    assert kwargs == {
        "master_nodes": "h:1 [2001:db8::1]:2",
        "name": "te st",
        "compress": "zlib=6",
    }
    # DB "cache_size" is spelled connection_cache_size: bare cache_size is the storage's
    kwargs, dbkw = parse_uri("neo://c@h:1?cache_size=100&connection_cache_size=5000")
    assert kwargs["cache_size"] == 100
    assert dbkw == {"connection_cache_size": 5000}


@pytest.mark.parametrize(
    "uri, fragment",
    [
        ("neo://c@h:1?bogus=1", "'bogus'"),
        ("neo://c@h:1?read_only=1&frobnicate=2", "'frobnicate'"),
        ("neo://c@h:1?read_only=maybe", "read_only"),
        ("neo://c@h:1?cache_size=lots", "cache_size"),
        ("neo://c@h:1?read_ahead=-1", "read_ahead"),
        ("neo://c@h:1?server_sync=sometimes", "server_sync"),
        ("neo://c@h:1?connect_timeout=-3", "connect_timeout"),
        ("neo://c@h:1?connection_pool_size=x", "connection_pool_size"),
        ("neo://c@h:1?read_only=1&read-only=0", "more than once"),
        ("neo://c@h:1?pool_size=1&connection_pool_size=2", "more than once"),
        ("neo://c@h:1?novalue", "query"),
        ("neo://h:1", "cluster name"),
        ("neo://@h:1", "cluster name"),
        ("neo://c@", "no master"),
        ("neo://c@h", "missing port"),
        ("neo://c@h:0", "port 0"),
        ("neo://c@h:1/path", "no path"),
        ("neo://c@h:1#frag", "fragment"),
        ("zeo://c@h:1", "not a neo://"),
    ],
)
def test_uri_errors(uri, fragment):
    with pytest.raises(ValueError) as exc:
        resolve_uri(uri)
    assert fragment in str(exc.value)


def test_factory_opens_storage(fake_storage):
    factory, _ = resolve_uri("neo://c@h:1,h:2?read_only=on")
    storage = factory()
    assert isinstance(storage, MappingStorage)
    assert fake_storage == [{"master_nodes": "h:1 h:2", "name": "c", "read_only": True}]


def test_zodburi_finds_resolver(fake_storage):
    factory, dbkw = zodburi.resolve_uri(
        "neo://test@127.0.0.1:10000?pool_size=3&database_name=x&cache_size=1KB"
    )
    assert isinstance(factory, NEOStorageFactory)
    assert factory.kwargs["cache_size"] == 1024
    # zodburi turned our raw keys into ZODB.DB keyword arguments
    assert dbkw["pool_size"] == 3
    assert dbkw["database_name"] == "x"
    db = ZODB.DB(factory(), **dbkw)
    try:
        assert db.database_name == "x"
    finally:
        db.close()
    with pytest.raises(ValueError, match="nope"):
        zodburi.resolve_uri("neo://test@127.0.0.1:10000?nope=1")


# -- ZConfig ------------------------------------------------------------------


def load_db_config(text):
    config, _ = ZConfig.loadConfigFile(ZODB.config.getDbSchema(), io.StringIO(text))
    return config.database[0].config.storage


@pytest.mark.parametrize("package", ["neozodb", "neozodb.client"])
def test_zconfig_snippet_defaults(package):
    factory = load_db_config(SNIPPET.format(package=package))
    assert isinstance(factory, NEOStorageConfig)
    c = factory.config
    assert c.master_nodes == "127.0.0.1:10000"
    assert c.name == "test"
    assert c.read_only is False
    assert c.compress is True
    assert c.cache_size == 20 << 20
    assert c.read_ahead == 32
    assert c.server_sync is True
    assert c.logfile is None
    assert c.ignore_wrong_checksum is False
    assert c.pack_gc is True
    assert c.connect_timeout == 60.0


def test_zconfig_values(tmp_path, fake_storage):
    logfile = str(tmp_path / "client.log")
    text = f"""\
%import neozodb
<neostorage main>
  master_nodes 127.0.0.1:10000, [::1]:10001  h:3
  name prod
  read-only on
  compress zlib=6
  cache-size 50MB
  read-ahead 0
  server-sync off
  logfile {logfile}
  ignore-wrong-checksum true
  pack-gc false
  connect-timeout 2.5
  blob-dir {tmp_path}/blobs
  blob-cache-size 100MB
</neostorage>
"""
    config, _ = ZConfig.loadConfigFile(ZODB.config.getStorageSchema(), io.StringIO(text))
    factory = config.storage
    assert factory.name == "main"
    expected = {
        "master_nodes": "127.0.0.1:10000 [::1]:10001 h:3",
        "name": "prod",
        "read_only": True,
        "compress": "zlib=6",
        "cache_size": 50 << 20,
        "read_ahead": 0,
        "server_sync": False,
        "logfile": logfile,
        "ignore_wrong_checksum": True,
        "pack_gc": False,
        "connect_timeout": 2.5,
        "blob_dir": f"{tmp_path}/blobs",
        "blob_cache_size": 100 << 20,
        "blob_cache_size_check": 10,
    }
    assert factory.storage_kwargs() == expected
    assert isinstance(factory.open(), MappingStorage)
    assert fake_storage == [expected]


def test_zconfig_database_from_string(fake_storage):
    db = ZODB.config.databaseFromString(SNIPPET.format(package="neozodb"))
    try:
        assert isinstance(db.storage, MappingStorage)
    finally:
        db.close()
    assert fake_storage == [
        {
            "master_nodes": "127.0.0.1:10000",
            "name": "test",
            "read_only": False,
            "compress": True,
            "cache_size": 20 << 20,
            "read_ahead": 32,
            "server_sync": True,
            "logfile": None,
            "ignore_wrong_checksum": False,
            "pack_gc": True,
            "connect_timeout": 60.0,
        }
    ]


@pytest.mark.parametrize(
    "body",
    [
        "name test",  # master_nodes missing
        "master_nodes h:1",  # name missing
        "master_nodes h\nname test",  # no port
        "master_nodes h:1\nname test\ncompress lz4",
        "master_nodes h:1\nname test\nread-only perhaps",
        "master_nodes h:1\nname test\nconnect-timeout soon",
        "master_nodes h:1\nname test\nbogus 1",
    ],
)
def test_zconfig_errors(body):
    text = f"%import neozodb\n<zodb>\n<NEOStorage>\n{body}\n</NEOStorage>\n</zodb>\n"
    with pytest.raises(ZConfig.ConfigurationError):
        load_db_config(text)


# -- TLS ------------------------------------------------------------------------


def test_tls_uris(monkeypatch):
    for name in ("NEO_CA", "NEO_CERT", "NEO_KEY"):
        monkeypatch.delenv(name, raising=False)
    # neo://: TLS only with the three files in the query
    kwargs, _ = parse_uri("neo://c@h:1?ca=/p/ca.crt&cert=/p/c.crt&key=/p/c.key")
    assert (kwargs["ca"], kwargs["cert"], kwargs["key"]) == ("/p/ca.crt", "/p/c.crt", "/p/c.key")
    assert "ca" not in parse_uri("neo://c@h:1")[0]
    with pytest.raises(ValueError, match="all of ca, cert and key"):
        parse_uri("neo://c@h:1?ca=/p/ca.crt")
    # neos://: always TLS, what the query lacks from the environment
    with pytest.raises(ValueError, match="NEO_CA"):
        parse_uri("neos://c@h:1")
    monkeypatch.setenv("NEO_CA", "/e/ca.crt")
    monkeypatch.setenv("NEO_CERT", "/e/c.crt")
    monkeypatch.setenv("NEO_KEY", "/e/c.key")
    kwargs, _ = parse_uri("neos://c@h:1?cert=/q/c.crt")
    assert (kwargs["ca"], kwargs["cert"], kwargs["key"]) == ("/e/ca.crt", "/q/c.crt", "/e/c.key")
    assert kwargs["master_nodes"] == "h:1" and kwargs["name"] == "c"


def test_zodburi_finds_neos_resolver(monkeypatch, fake_storage):
    monkeypatch.setenv("NEO_CA", "/e/ca.crt")
    monkeypatch.setenv("NEO_CERT", "/e/c.crt")
    monkeypatch.setenv("NEO_KEY", "/e/c.key")
    factory, _ = zodburi.resolve_uri("neos://c@h:1")
    factory()
    assert fake_storage[-1]["ca"] == "/e/ca.crt"


def test_zconfig_tls_keys(tmp_path, fake_storage):
    files = {}
    for key in ("ca", "cert", "key"):
        files[key] = str(tmp_path / (key + ".pem"))
        open(files[key], "w").close()
    text = f"""\
%import neozodb
<neostorage main>
  master_nodes 127.0.0.1:10000
  name prod
  ca {files["ca"]}
  cert {files["cert"]}
  key {files["key"]}
</neostorage>
"""
    config, _ = ZConfig.loadConfigFile(ZODB.config.getStorageSchema(), io.StringIO(text))
    kwargs = config.storage.storage_kwargs()
    assert {k: kwargs[k] for k in files} == files
