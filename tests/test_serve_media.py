"""llava_next.serve.media: image URLs from strangers, turned into images only as the operator allowed.

Offline: the remote tests talk to scripted servers on 127.0.0.1, host names resolve through a fake resolver, and a
wall refuses any connection to an address outside the loopback range, so even a wrong implementation sends nothing
to 10.0.0.1 or the metadata service. Each test is plain pytest around asyncio.run.
"""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from hostile_images import png_header_only
from llava_next.serve import media
from llava_next.serve.media import MediaError, MediaPolicy, is_public_address, load_image_url

LOOPBACK = ipaddress.ip_address("127.0.0.1")


def only_127_0_0_1(address) -> bool:
    """The tests' address rule: the one loopback address the scripted servers listen on, nothing else."""
    return address == LOOPBACK


def remote(**options) -> MediaPolicy:
    return MediaPolicy(**{"allow_remote": True, "address_allowed": only_127_0_0_1, **options})


def png(width: int = 6, height: int = 4) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def load(url: str, policy: MediaPolicy = MediaPolicy()) -> Image.Image:
    return asyncio.run(load_image_url(url, policy, label="messages[0].content[1]"))


def refused(url: str, policy: MediaPolicy = MediaPolicy(), status: int = 400) -> str:
    """The message of the MediaError loading `url` raises, after checking its status."""
    with pytest.raises(MediaError) as caught:
        load(url, policy)
    assert caught.value.status == status, str(caught.value)
    assert str(caught.value).startswith("messages[0].content[1]: ")
    return str(caught.value)


# ---------------------------------------------------------------------------------------------------------------------
# The network, made safe and scriptable


@pytest.fixture(autouse=True)
def connections(monkeypatch) -> list[str]:
    """Every address a TCP connection was attempted to; any outside 127.0.0.0/8 is refused before a packet leaves."""
    attempts: list[str] = []
    real_create_connection = asyncio.BaseEventLoop.create_connection

    async def create_connection(self, protocol_factory, host=None, port=None, *args, **kwargs):
        attempts.append(host)
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:  # a host name: the code under test must connect to the address it checked
            loopback = False
        if not loopback:
            raise ConnectionRefusedError(f"test wall: no connections to {host!r}")
        return await real_create_connection(self, protocol_factory, host, port, *args, **kwargs)

    monkeypatch.setattr(asyncio.BaseEventLoop, "create_connection", create_connection)
    return attempts


class FakeDNS:
    """Host name -> the answers to successive lookups (the last one repeats). Address literals resolve as usual
    (no network); any other name does not resolve."""

    def __init__(self):
        self.answers: dict[str, list[list[str]]] = {}
        self.lookups: list[str] = []

    def __setitem__(self, name: str, addresses: list[str] | list[list[str]]):
        self.answers[name] = addresses if isinstance(addresses[0], list) else [addresses]


@pytest.fixture(autouse=True)
def dns(monkeypatch) -> FakeDNS:
    fake = FakeDNS()
    real_getaddrinfo = asyncio.BaseEventLoop.getaddrinfo

    async def getaddrinfo(self, host, port, *args, **kwargs):
        host = host.decode() if isinstance(host, bytes) else host
        fake.lookups.append(host)
        if host in fake.answers:
            answers = fake.answers[host]
            addresses = answers.pop(0) if len(answers) > 1 else answers[0]
            return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "",
                     (a, port) if ":" not in a else (a, port, 0, 0)) for a in addresses]
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (test resolver)") from None
        return await real_getaddrinfo(self, host, port, *args, **kwargs)

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", getaddrinfo)
    return fake


class Server:
    """A scripted HTTP/1.1 server on 127.0.0.1 for one test: `routes` maps a path to a coroutine function that
    writes the whole answer to the connection's writer. Keeps each request's path and headers."""

    def __init__(self, routes, tls: ssl.SSLContext | None = None):
        self.routes = routes
        self.tls = tls
        self.requests: list[tuple[str, dict[str, str]]] = []

    async def __aenter__(self) -> "Server":
        self.server = await asyncio.start_server(self._answer, "127.0.0.1", 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info):
        self.server.close()  # handlers still stalling are cancelled when asyncio.run ends

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}{path}"

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            path = head[0].split(" ")[1]
            headers = dict(line.split(": ", 1) for line in head[1:] if line)
            self.requests.append((path, {k.lower(): v for k, v in headers.items()}))
            await self.routes[path](writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()


def answer(body: bytes, status: str = "200 OK", headers: str | None = None):
    async def write(writer):
        head = headers if headers is not None else f"Content-Length: {len(body)}\r\nContent-Type: image/png\r\n"
        writer.write(f"HTTP/1.1 {status}\r\n{head}Connection: close\r\n\r\n".encode() + body)
        await writer.drain()
    return write


def redirect(location: str, status: str = "302 Found"):
    return answer(b"", status, f"Location: {location}\r\nContent-Length: 0\r\n")


def stall_after(head: bytes):
    async def write(writer):
        writer.write(head)
        await writer.drain()
        await asyncio.sleep(3600)
    return write


def fetch(routes: dict, path: str, policy: MediaPolicy, host: str = "127.0.0.1", tls=None):
    """(the image or the MediaError, the server, seconds taken) for loading `path` from a server with `routes`."""
    async def run():
        async with Server(routes, tls) as server:
            start = time.monotonic()
            try:
                result = await load_image_url(server.url(path, host), policy, label="image")
            except MediaError as e:
                result = e
            return result, server, time.monotonic() - start
    return asyncio.run(run())


# ---------------------------------------------------------------------------------------------------------------------
# data: URLs


def test_data_urls_as_browsers_write_them_decode():
    assert load(data_url(png(6, 4))).size == (6, 4)
    jpeg = io.BytesIO()
    Image.new("RGB", (9, 5)).save(jpeg, "JPEG")
    assert load(data_url(jpeg.getvalue(), "image/jpeg")).size == (9, 5)
    # FileReader.readAsDataURL on a file of unknown type; upper case; a parameter before ;base64
    assert load(data_url(png(), "application/octet-stream")).size == (6, 4)
    assert load(data_url(png(), "IMAGE/PNG").replace(";base64", ";BASE64")).size == (6, 4)
    assert load(data_url(png(), "image/png;name=red.png")).size == (6, 4)


@pytest.mark.parametrize("url, problem", [
    ("data:image/png;base64" + base64.b64encode(png()).decode(), "needs a comma"),
    ("data:image/png," + base64.b64encode(png()).decode(), "only base64 data URLs"),
    ("data:image/png;charset=utf-8," + base64.b64encode(png()).decode(), "only base64 data URLs"),
    ("data:;base64," + base64.b64encode(png()).decode(), "is not an image"),
    (data_url(png(), "text/plain"), "is not an image"),
    (data_url(png(), "text/html"), "is not an image"),
    (data_url(png(), "image/"), "is not an image"),
    ("data:image/png;base64,", "no data"),
    ("data:image/png;base64,iVBORw0KGgo*AAAA", "not valid base64"),
    ("data:image/png;base64,iVBORw0K\nGgoAAAA", "not valid base64"),
    ("data:image/png;base64,iVBORw0KGgo", "not valid base64"),  # padding missing
    ("data:image/png;base64,iVBORw0K-_oAAAA", "not valid base64"),  # URL-safe alphabet
    ("data:image/png;base64,iVBORw0KGgoAAAé", "not valid base64"),
    (data_url(b"\x89PNG\r\n\x1a\n not really"), "truncated or corrupt|not an image format"),
    (data_url(b"GIF89a" + bytes(40)), "truncated or corrupt|not an image format"),
])
def test_malformed_data_urls_are_400(url, problem):
    assert re.search(problem, refused(url))


def test_data_url_size_is_checked_before_base64_is_decoded(monkeypatch):
    image = png()
    assert load(data_url(image), MediaPolicy(max_image_bytes=len(image))).size == (6, 4)  # exactly at the limit

    def no_decoding(*args, **kwargs):
        raise AssertionError("base64 decoded before the size was checked")

    monkeypatch.setattr(base64, "b64decode", no_decoding)
    message = refused(data_url(image), MediaPolicy(max_image_bytes=len(image) - 1), status=413)
    assert f"{len(image)} bytes of image, over the limit of {len(image) - 1} bytes" in message


def test_messages_never_carry_the_image_data():
    payload = "A" * 2_000_001 + "*"  # megabytes of base64, invalid at the end
    message = refused("data:image/png;base64," + payload)
    assert len(message) < 400 and "AAAAAAAAAA" not in message
    unknown = refused("gopher://" + "x" * 100_000)
    assert len(unknown) < 400 and "100009 characters" in unknown


def test_decompression_bombs_are_413():
    bomb = png_header_only(100_000, 100_000)  # 10 billion pixels in a few dozen bytes
    assert len(bomb) < 200
    assert re.search("decompression bomb|over the limit", refused(data_url(bomb), status=413))
    message = refused(data_url(png(100, 100)), MediaPolicy(max_image_pixels=9_999), status=413)
    assert "100x100 = 10000 pixels is over the limit of 9999" in message


# ---------------------------------------------------------------------------------------------------------------------
# Which addresses count as public


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.1.2.3", "10.0.0.1", "172.16.0.1", "172.31.255.255", "192.168.1.1",
    "169.254.169.254",  # cloud metadata
    "100.64.0.1",  # carrier-grade NAT
    "0.0.0.0", "0.1.2.3", "224.0.0.1", "239.255.255.250", "255.255.255.255", "240.0.0.1",
    "192.0.2.1", "198.18.0.1", "198.51.100.7", "203.0.113.9",
    "::1", "::", "fe80::1", "fe80::1%1", "fc00::1", "fd00:ec2::254", "fec0::1", "ff02::1", "2001:db8::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::ffff:0.0.0.0", "::127.0.0.1",
    "64:ff9b::10.0.0.1", "64:ff9b::127.0.0.1", "2002:7f00:1::1", "2002:a00:1::1",
])
def test_non_public_addresses_are_refused_by_default(address):
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "151.101.1.69", "2606:4700:4700::1111",
                                     "::ffff:8.8.8.8", "64:ff9b::8.8.8.8", "2002:808:808::1"])
def test_public_addresses_are_allowed_by_default(address):
    assert is_public_address(ipaddress.ip_address(address))
    assert MediaPolicy().address_allowed(ipaddress.ip_address(address))


# ---------------------------------------------------------------------------------------------------------------------
# http(s):// URLs


def test_remote_urls_are_refused_unless_allowed(connections, dns):
    for url in ("http://127.0.0.1:9/a.png", "https://images.example/a.png", "HTTP://images.example/a.png"):
        assert "--allow-remote-images" in refused(url)
    assert connections == [] and dns.lookups == []


def test_remote_image_is_fetched_from_the_checked_address_with_the_host_name_kept(dns):
    # The name resolves to 127.0.0.1 once, then (a rebinding attacker's DNS) to another address: the connection
    # must go to the address that was checked, so a second lookup would miss the server.
    dns["images.test"] = [["127.0.0.1"], ["127.0.0.3"]]
    image, server, _ = fetch({"/cat.png": answer(png(7, 3))}, "/cat.png", remote(), host="images.test")
    assert not isinstance(image, MediaError), image
    assert image.size == (7, 3)
    assert dns.lookups.count("images.test") == 1
    [(path, headers)] = server.requests
    assert headers["host"] == f"images.test:{server.port}"
    assert "cookie" not in headers and "authorization" not in headers and headers["accept-encoding"] == "identity"


def test_a_host_with_any_non_public_address_is_refused(dns, connections):
    dns["mixed.test"] = ["127.0.0.1", "10.0.0.1"]  # the first answer alone would pass
    error, _, _ = fetch({"/a.png": answer(png())}, "/a.png", remote(), host="mixed.test")
    assert isinstance(error, MediaError) and "non-public address" in str(error)
    assert connections == []
    error, _, _ = fetch({"/a.png": answer(png())}, "/a.png", MediaPolicy(allow_remote=True))  # the default rule
    assert isinstance(error, MediaError) and "non-public address" in str(error) and "127.0.0.1" in str(error)
    assert connections == []


def test_remote_size_cap_while_streaming_without_content_length():
    sent = []

    def endless(chunked: bool):
        async def write(writer):
            framing = "Transfer-Encoding: chunked" if chunked else "Connection: close"
            writer.write(f"HTTP/1.1 200 OK\r\n{framing}\r\n\r\n".encode())
            block = png() + bytes(65_536)
            for _ in range(1_000):  # 65 MB at most, and only if nobody stops reading
                writer.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
                await writer.drain()
                sent.append(len(block))
            await asyncio.sleep(3600)
        return write

    for chunked in (False, True):
        sent.clear()
        error, _, seconds = fetch({"/big": endless(chunked)}, "/big", remote(max_image_bytes=100_000, fetch_timeout=5))
        assert isinstance(error, MediaError) and error.status == 413, error
        assert "passed the limit of 100000 bytes" in str(error)
        assert seconds < 3


def test_remote_content_length_over_the_cap_is_refused_before_the_body():
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n"  # then nothing: reading the body would time out
    error, _, seconds = fetch({"/huge": stall_after(head)}, "/huge", remote(fetch_timeout=5))
    assert isinstance(error, MediaError) and error.status == 413
    assert "says the image is 1000000000 bytes, over the limit of 20971520" in str(error)
    assert seconds < 3


def test_remote_lying_content_length_reads_no_more_than_declared():
    image = png()
    # says half the image, sends megabytes: the image arrives cut short, and nothing past it is read
    short = answer(image + bytes(5_000_000), headers=f"Content-Length: {len(image) // 2}\r\n")
    error, _, seconds = fetch({"/lie": short}, "/lie", remote(max_image_bytes=len(image) + 100))
    assert isinstance(error, MediaError) and error.status == 400 and "corrupt" in str(error)
    bogus = answer(image, headers="Content-Length: -1\r\n")
    error, _, _ = fetch({"/bogus": bogus}, "/bogus", remote())
    assert isinstance(error, MediaError) and error.status == 400 and "could not fetch" in str(error)


def test_remote_error_status_is_400_naming_it():
    error, _, _ = fetch({"/missing.png": answer(b"not here", "404 Not Found")}, "/missing.png", remote())
    assert isinstance(error, MediaError) and error.status == 400 and "HTTP 404" in str(error)
    error, _, _ = fetch({"/loop": answer(b"", "302 Found")}, "/loop", remote())  # a redirect with no Location
    assert isinstance(error, MediaError) and "HTTP 302" in str(error)


def test_compressed_answers_are_refused():
    gzip_answer = answer(png(), headers="Content-Encoding: gzip\r\nContent-Length: 10\r\n")
    error, _, _ = fetch({"/a.png": gzip_answer}, "/a.png", remote())
    assert isinstance(error, MediaError) and "gzip" in str(error)


def test_redirects_are_followed_within_the_limit():
    routes = {"/1": redirect("/2"), "/2": redirect("/3", "301 Moved Permanently"), "/3": answer(png(5, 5))}
    image, server, _ = fetch(routes, "/1", remote(max_redirects=2))
    assert image.size == (5, 5) and [path for path, _ in server.requests] == ["/1", "/2", "/3"]
    error, server, _ = fetch(routes, "/1", remote(max_redirects=1))
    assert isinstance(error, MediaError) and "more than 1 redirects" in str(error)
    assert [path for path, _ in server.requests] == ["/1", "/2"]
    endless = {"/loop": redirect("/loop")}
    error, server, _ = fetch(endless, "/loop", remote())
    assert isinstance(error, MediaError) and "more than 3 redirects" in str(error) and len(server.requests) == 4
    assert f"starting at 'http://127.0.0.1:{server.port}/loop'" in str(error)


@pytest.mark.parametrize("target", [
    "http://127.0.0.2:{port}/a.png",  # loopback, but not the address the test allows
    "http://10.0.0.1/a.png", "http://169.254.169.254/latest/meta-data/", "http://[::ffff:127.0.0.2]:{port}/a.png",
    "http://inward.test:{port}/a.png",  # a name that resolves to a forbidden address
])
def test_every_redirect_hop_is_checked_again(target, dns, connections):
    dns["inward.test"] = ["127.0.0.2"]
    port = []  # the server's, known once it listens

    async def to_target(writer):
        await redirect(target.format(port=port[0]))(writer)

    async def run():
        async with Server({"/start": to_target}) as server:
            port.append(server.port)
            with pytest.raises(MediaError, match="non-public address") as caught:
                await load_image_url(server.url("/start"), remote(), label="image")
            return caught.value, server

    error, server = asyncio.run(run())
    assert error.status == 400 and len(server.requests) == 1
    assert connections == ["127.0.0.1"]  # only the first hop connected


@pytest.mark.parametrize("target, problem", [
    ("file:///etc/passwd", "only http(s):// redirects"),
    ("FILE:/etc/passwd", "only http(s):// redirects"),
    ("data:image/png;base64,AAAA", "only http(s):// redirects"),
    ("ftp://127.0.0.1/a.png", "only http(s):// redirects"),
    ("http://user:secret@127.0.0.1/a.png", "user name or password"),
])
def test_redirects_to_other_schemes_or_credentials_are_refused(target, problem):
    error, _, _ = fetch({"/start": redirect(target)}, "/start", remote(allowed_local_path=Path("/")))
    assert isinstance(error, MediaError) and problem in str(error) and "secret" not in str(error)


def test_a_stalling_or_trickling_server_times_out():
    async def trickle(writer):  # each byte in time for a per-read timeout, the whole never in time
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(1000):
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.05)

    for handler in (stall_after(b""), trickle):
        error, _, seconds = fetch({"/slow": handler}, "/slow", remote(fetch_timeout=0.5))
        assert isinstance(error, MediaError) and error.status == 400 and "longer than 0.5 s" in str(error)
        assert seconds < 2


def test_unresolvable_host_is_400():
    assert "could not be resolved" in refused("http://nowhere.test/a.png", remote())


def test_credentials_in_the_url_are_refused_without_echoing_them(connections):
    message = refused("http://user:hunter2@127.0.0.1:9/a.png", remote())
    assert "user name or password" in message and "hunter2" not in message and connections == []


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    """A test CA and a certificate it signed for images.test, made with the openssl command."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make test certificates")
    directory = tmp_path_factory.mktemp("tls")

    def run(*args):
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=llava-next test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    run("req", *ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=images.test")
    (directory / "leaf.ext").write_text("subjectAltName=DNS:images.test\nbasicConstraints=CA:FALSE\n")
    run("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "leaf.pem",
        "-days", "2", "-extfile", "leaf.ext")
    return directory


def test_https_checks_the_certificate_against_the_host_name_not_the_address(certificates, dns, monkeypatch):
    monkeypatch.setattr(media, "_tls_context", lambda: ssl.create_default_context(cafile=certificates / "ca.pem"))
    server_names = []
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(certificates / "leaf.pem", certificates / "leaf.key")
    tls.sni_callback = lambda connection, name, context: server_names.append(name)
    dns["images.test"] = ["127.0.0.1"]
    dns["other.test"] = ["127.0.0.1"]
    routes = {"/a.png": answer(png(3, 2))}

    image, server, _ = fetch(routes, "/a.png", remote(), host="images.test", tls=tls)
    assert not isinstance(image, MediaError), image
    assert image.size == (3, 2) and server_names == ["images.test"]
    assert server.requests[0][1]["host"] == f"images.test:{server.port}"
    for host in ("other.test", "127.0.0.1"):  # the certificate names neither
        error, _, _ = fetch(routes, "/a.png", remote(), host=host, tls=tls)
        assert isinstance(error, MediaError) and "could not fetch" in str(error) and "certificate" in str(error).lower()


# ---------------------------------------------------------------------------------------------------------------------
# file:// URLs and plain paths


@pytest.fixture
def media_dir(tmp_path) -> Path:
    """tmp/media (allowed) with red.png and a sub-directory; tmp/media-evil and tmp/secret.png beside it."""
    (tmp_path / "media" / "sub").mkdir(parents=True)
    (tmp_path / "media" / "red.png").write_bytes(png(6, 4))
    (tmp_path / "media" / "with space.png").write_bytes(png(2, 2))
    (tmp_path / "media-evil").mkdir()
    (tmp_path / "media-evil" / "x.png").write_bytes(png())
    (tmp_path / "secret.png").write_bytes(png())
    return tmp_path / "media"


def local(directory: Path, **options) -> MediaPolicy:
    return MediaPolicy(allowed_local_path=directory, **options)


def test_local_files_are_refused_unless_a_directory_is_allowed(media_dir):
    for url in (str(media_dir / "red.png"), (media_dir / "red.png").as_uri(), "red.png"):
        assert "--allowed-local-media-path" in refused(url)


def test_local_files_inside_the_allowed_directory_are_read(media_dir):
    policy = local(media_dir)
    assert load(str(media_dir / "red.png"), policy).size == (6, 4)
    assert load("red.png", policy).size == (6, 4)  # relative to the allowed directory
    assert load("sub/../red.png", policy).size == (6, 4)
    assert load((media_dir / "with space.png").as_uri(), policy).size == (2, 2)  # file:///.../with%20space.png
    assert load("file://localhost" + str(media_dir / "red.png"), policy).size == (6, 4)
    assert load(str(media_dir / "red.png"), MediaPolicy(allowed_local_path=str(media_dir))).size == (6, 4)


def test_paths_outside_the_allowed_directory_are_refused_alike(media_dir):
    policy = local(media_dir)
    outside = [
        str(media_dir / ".." / "secret.png"), "../secret.png", (media_dir / ".." / "secret.png").as_uri(),
        str(media_dir.parent / "media-evil" / "x.png"),  # a sibling whose name starts with the allowed one's
        "/etc/passwd", "../nonexistent.png", "/nonexistent/dir/x.png",
    ]
    messages = {refused(url, policy).replace(media._printable_url(url), "URL") for url in outside}
    assert messages == {"messages[0].content[1]: URL is outside the directory this server reads images from "
                        "(--allowed-local-media-path); give a file inside it"}  # existence outside is never told


def test_symlinks_out_of_the_allowed_directory_are_refused(media_dir):
    (media_dir / "link.png").symlink_to(media_dir.parent / "secret.png")
    (media_dir / "evil-dir").symlink_to(media_dir.parent / "media-evil", target_is_directory=True)
    (media_dir / "inside.png").symlink_to(media_dir / "red.png")
    policy = local(media_dir)
    assert "outside the directory" in refused(str(media_dir / "link.png"), policy)
    assert "outside the directory" in refused("evil-dir/x.png", policy)
    assert load("inside.png", policy).size == (6, 4)  # a link that stays inside is fine
    # the allowed directory itself reached through a symlink
    (media_dir.parent / "alias").symlink_to(media_dir, target_is_directory=True)
    assert load("red.png", local(media_dir.parent / "alias")).size == (6, 4)
    assert "outside the directory" in refused("../secret.png", local(media_dir.parent / "alias"))


def test_local_non_files_are_refused_without_blocking(media_dir):
    policy = local(media_dir)
    assert "is a directory" in refused("sub", policy)
    assert "is a directory" in refused(str(media_dir), policy)
    assert "no such image file" in refused("missing.png", policy)
    fifo = media_dir / "pipe.png"
    os.mkfifo(fifo)

    async def load_fifo():
        try:
            return await asyncio.wait_for(load_image_url("pipe.png", policy), 5)
        except asyncio.TimeoutError:
            # free a reader stuck in open() so the test can end, then fail
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            pytest.fail("reading a FIFO blocked")

    with pytest.raises(MediaError, match="not a regular file") as caught:
        asyncio.run(load_fifo())
    assert caught.value.status == 400


def test_local_size_limits_are_413(media_dir):
    size = (media_dir / "red.png").stat().st_size
    assert "over the limit" in refused("red.png", local(media_dir, max_image_bytes=size - 1), status=413)
    assert "over the limit" in refused("red.png", local(media_dir, max_image_pixels=23), status=413)


@pytest.mark.parametrize("url, problem", [
    ("file://otherhost/etc/passwd", "names the host"),
    ("file://red.png", "names the host"),
    ("file:red.png", "absolute path"),
    ("file:///x.png?query", "query or fragment"),
    ("file:///etc/passwd%00.png", "cannot be read"),
    ("bad\x00name.png", "cannot be read"),
])
def test_malformed_file_urls_are_400(media_dir, url, problem):
    assert problem in refused(url, local(media_dir))


def test_a_url_that_is_not_a_string_is_400():
    with pytest.raises(MediaError, match="must be a string, got dict") as caught:
        asyncio.run(load_image_url({"url": "data:..."}, MediaPolicy()))
    assert caught.value.status == 400


def test_policy_settings_are_checked():
    with pytest.raises(MediaError, match="not an existing directory"):
        MediaPolicy(allowed_local_path=Path("/nonexistent/media"))
    with pytest.raises(MediaError, match="fetch_timeout"):
        MediaPolicy(fetch_timeout=0)
    with pytest.raises(MediaError, match="max_redirects"):
        MediaPolicy(max_redirects=-1)


# ---------------------------------------------------------------------------------------------------------------------
# Anything else


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "gopher://127.0.0.1:6379/_INFO", "javascript:alert(1)",
                                 "", "blob:https://example.com/uuid", "ws://example.com/a", "//example.com/a.png"])
def test_unknown_schemes_are_400(url, connections, dns, tmp_path):
    message = refused(url, MediaPolicy(allow_remote=True, allowed_local_path=tmp_path))
    assert "unsupported URL" in message or "empty" in message
    assert connections == [] and dns.lookups == []
