"""The images a server request names by URL: data URLs, http(s) downloads and local files, each only as allowed.

`load_image_url` turns the url of an OpenAI `image_url` part into a decoded PIL image, or raises MediaError with
the HTTP status to answer. A URL comes from a stranger, so what it may reach is the operator's choice (MediaPolicy):
  - data: URLs are always read; their size is known from the base64 length before anything is decoded.
  - http(s):// URLs are fetched only with --allow-remote-images, and never from the server's own network: every
    address the host resolves to must be public, the connection goes to the address that was checked (a second
    DNS lookup could answer differently: DNS rebinding), and every redirect is checked again, as a new URL.
    The download has a byte cap enforced while it streams, a total time limit, and carries no cookies,
    credentials or environment proxies.
  - file:// URLs and plain paths are read only with --allowed-local-media-path, and only for files whose real
    path (symlinks and `..` resolved) lies inside that directory.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import ipaddress
import os
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union
from urllib.parse import unquote_to_bytes, urlsplit

import httpx
from PIL import Image

from ..errors import LlavaError
from ..image import DEFAULT_MAX_PIXELS, ImageError, ImageLimits, ImageTooLarge, decode_image

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

BAD_REQUEST = 400
PAYLOAD_TOO_LARGE = 413

REMOTE_FLAG = "--allow-remote-images"
LOCAL_FLAG = "--allowed-local-media-path"


class MediaError(LlavaError, ValueError):
    """An image URL that cannot be used; `status` is the HTTP status to answer (413 for a size limit, else 400)."""

    def __init__(self, message: str, status: int = BAD_REQUEST):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------------------------------------
# Which addresses a download may reach

# IPv6 prefixes that reach the IPv4 address in their last 32 bits through a NAT64 gateway (RFC 6052, RFC 8215).
_NAT64_PREFIXES = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))


def is_public_address(address: IPAddress) -> bool:
    """Whether an address is on the public internet: not private, loopback, link-local (169.254.169.254, the cloud
    metadata service, is one), carrier-grade NAT, multicast, reserved, unspecified or documentation-only. An IPv6
    address that carries an IPv4 address (::ffff:127.0.0.1, a NAT64 or 6to4 address) is judged by that too."""
    if isinstance(address, ipaddress.IPv6Address):
        # A mapped or NAT64 address is only another spelling of the IPv4 address it reaches.
        translated = address.ipv4_mapped
        if translated is None and any(address in prefix for prefix in _NAT64_PREFIXES):
            translated = ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
        if translated is not None:
            return is_public_address(translated)
        if address.sixtofour is not None and not is_public_address(address.sixtofour):
            return False
        if address.is_site_local:  # fec0::/10, deprecated but still routed inside some networks
            return False
    # is_global alone has differed between Python versions (multicast counts as global), so every flag is asked.
    return address.is_global and not (
        address.is_private or address.is_loopback or address.is_link_local or address.is_multicast
        or address.is_reserved or address.is_unspecified
    )


# ---------------------------------------------------------------------------------------------------------------------
# The policy


@dataclass(frozen=True)
class MediaPolicy:
    """What a server may do to get an image named by URL: the operator's flags. Everything off by default except
    data: URLs, which carry the image itself."""

    allow_remote: bool = False  # http(s):// URLs only when the operator allowed them (--allow-remote-images)
    allowed_local_path: Path | None = None  # file:// URLs and plain paths only under this directory
    max_image_bytes: int = 20 * 2**20  # encoded bytes per image
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    fetch_timeout: float = 10.0  # seconds, the whole download: resolving, connecting, every redirect, the body
    max_redirects: int = 3
    address_allowed: Callable[[IPAddress], bool] = is_public_address  # tests replace it

    def __post_init__(self):
        if self.max_image_bytes < 1 or self.max_image_pixels < 1:
            raise MediaError(f"max_image_bytes and max_image_pixels must be at least 1, got {self.max_image_bytes} "
                             f"and {self.max_image_pixels}")
        if not self.fetch_timeout > 0:
            raise MediaError(f"fetch_timeout must be a positive number of seconds, got {self.fetch_timeout}")
        if self.max_redirects < 0:
            raise MediaError(f"max_redirects must be 0 or more, got {self.max_redirects}")
        if self.allowed_local_path is not None:
            directory = Path(self.allowed_local_path)
            if not directory.is_dir():
                raise MediaError(f"{LOCAL_FLAG} {_printable_url(str(directory))}: not an existing directory")
            object.__setattr__(self, "allowed_local_path", directory)  # a str given is kept as a Path

    @property
    def limits(self) -> ImageLimits:
        return ImageLimits(max_pixels=self.max_image_pixels, max_bytes=self.max_image_bytes)


# ---------------------------------------------------------------------------------------------------------------------
# The entry point

# RFC 3986: a scheme is a letter, then letters, digits, "+", "-" or ".", then ":".
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


async def load_image_url(url: str, policy: MediaPolicy, label: str = "image") -> Image.Image:
    """The image an OpenAI `image_url` names, fully decoded (EXIF orientation applied, mode as stored), or
    MediaError with the status to answer. `label` names the image in messages (say, "messages[0].content[1]").

    Decoding runs in a worker thread, so a large image does not stall the event loop."""
    if not isinstance(url, str):
        raise MediaError(f"{label}: the image URL must be a string, got {type(url).__name__}")
    if not url:
        raise MediaError(f"{label}: the image URL is empty; give a data:, http(s):// or file:// URL")
    match = _SCHEME.match(url)
    scheme = match.group(1).lower() if match else None
    if scheme == "data":
        data = _data_url_bytes(url, policy, label)
    elif scheme in ("http", "https"):
        data = await _download(url, policy, label)
    elif scheme == "file" or (scheme is None and "://" not in url and not url.startswith("//")):
        return await _decode(_local_file(url, scheme, policy, label), policy, label)
    else:
        shown = f"scheme {scheme!r}" if scheme else "form"
        raise MediaError(f"{label}: unsupported URL {shown} in {_printable_url(url)}; give a data:, http(s):// or "
                         "file:// URL")
    return await _decode(data, policy, label)


async def _decode(source: bytes | Path, policy: MediaPolicy, label: str) -> Image.Image:
    try:
        return await asyncio.to_thread(decode_image, source, policy.limits, label)
    except ImageTooLarge as e:
        raise MediaError(str(e), PAYLOAD_TOO_LARGE) from None
    except ImageError as e:
        raise MediaError(str(e)) from None


def _printable_url(url: str, keep: int = 100) -> str:
    """A URL for a message: quoted and escaped (no control characters reach a log), and cut short, since a data URL
    can be megabytes of base64 that nobody wants to read back."""
    if len(url) <= keep:
        return ascii(url)
    return f"{ascii(url[:keep])}... ({len(url)} characters)"


# ---------------------------------------------------------------------------------------------------------------------
# data: URLs

# The media types a data URL may declare: any image type, and what a browser's FileReader.readAsDataURL writes for a
# file whose type it does not know. The decoder looks at the bytes, not at this, to decide the format.
_IMAGE_MEDIA_TYPE = re.compile(r"image/[a-z0-9.+-]+|application/octet-stream")


def _data_url_bytes(url: str, policy: MediaPolicy, label: str) -> bytes:
    """The bytes of `data:<image type>[;parameter...];base64,<data>`, the form browsers write; the size the base64
    implies is checked against the limit before it is decoded."""
    header, comma, payload = url[len("data:"):].partition(",")
    if not comma:
        raise MediaError(f"{label}: a data URL needs a comma before its data, as in data:image/png;base64,iVBOR...")
    media_type, *parameters = [part.strip().lower() for part in header.split(";")]
    if not parameters or parameters[-1] != "base64":
        raise MediaError(f"{label}: only base64 data URLs are read; write data:{media_type or 'image/png'};base64,"
                         "<base64 data>")
    if not _IMAGE_MEDIA_TYPE.fullmatch(media_type):
        raise MediaError(f"{label}: a data URL of type {_printable_url(media_type, 40)} is not an image; give an "
                         "image/... type such as image/png or image/jpeg")
    padding = 2 if payload.endswith("==") else 1 if payload.endswith("=") else 0
    size = len(payload) * 3 // 4 - padding  # exact for well-formed base64
    if size > policy.max_image_bytes:
        raise MediaError(f"{label}: the data URL holds {size} bytes of image, over the limit of "
                         f"{policy.max_image_bytes} bytes per image; send a smaller image", PAYLOAD_TOO_LARGE)
    if not payload:
        raise MediaError(f"{label}: the data URL has no data after the comma")
    try:
        # validate: any character outside the base64 alphabet (a space, a newline, URL-safe "-" or "_") is an error
        # rather than silently skipped, and so is missing padding.
        return base64.b64decode(payload.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise MediaError(f"{label}: the data URL's data is not valid base64 (standard alphabet, padded with '=', "
                         "no spaces or line breaks)") from None


# ---------------------------------------------------------------------------------------------------------------------
# http(s):// URLs

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


@functools.lru_cache(maxsize=None)
def _tls_context() -> ssl.SSLContext:
    """Certificate checks against httpx's bundled CA list (certifi), made once: loading it takes milliseconds."""
    return httpx.create_ssl_context(trust_env=False)


async def _download(url: str, policy: MediaPolicy, label: str) -> bytes:
    if not policy.allow_remote:
        raise MediaError(f"{label}: this server does not fetch images from http(s) URLs; send the image inline as "
                         f"a data: URL, or start the server with {REMOTE_FLAG}")
    try:
        return await asyncio.wait_for(_follow_redirects(url, policy, label), policy.fetch_timeout)
    except asyncio.TimeoutError:
        raise MediaError(f"{label}: fetching {_printable_url(url)} took longer than {policy.fetch_timeout:g} s; "
                         "give a faster URL or send the image inline as a data: URL") from None


async def _follow_redirects(url: str, policy: MediaPolicy, label: str) -> bytes:
    """Each hop is a new URL: its scheme, host and address are checked as the first one's were, and it is fetched
    by a fresh transport, so nothing (cookies, connections) carries from one host to the next."""
    first = url
    for _ in range(policy.max_redirects + 1):
        target = _remote_url(url, label)
        address = await _checked_address(target, policy, label)
        try:
            location = await _fetch_or_redirect(target, address, policy, label)
        except httpx.TimeoutException:
            raise asyncio.TimeoutError from None  # one message for every kind of running out of time
        except (httpx.HTTPError, httpx.InvalidURL, OSError) as e:
            raise MediaError(f"{label}: could not fetch {_printable_url(str(target))} ({_describe(e)})") from None
        if isinstance(location, bytes):
            return location
        url = location
    raise MediaError(f"{label}: more than {policy.max_redirects} redirects starting at {_printable_url(first)}; "
                     "give the image's final URL")


def _remote_url(url: str, label: str) -> httpx.URL:
    try:
        target = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as e:
        raise MediaError(f"{label}: {_printable_url(url)} is not a valid URL ({_describe(e)})") from None
    if target.scheme not in ("http", "https"):  # load_image_url and _redirect_target send nothing else here
        raise MediaError(f"{label}: {_printable_url(url)} is not an http(s):// URL")
    if target.userinfo:
        # The URL is not repeated: it would put the password in the server's logs.
        raise MediaError(f"{label}: the URL for {target.host!r} carries a user name or password; the server sends "
                         "no credentials, so give a URL without them")
    if not target.raw_host:
        raise MediaError(f"{label}: {_printable_url(url)} has no host")
    return target


def _default_port(target: httpx.URL) -> int:
    return target.port or (443 if target.scheme == "https" else 80)


async def _checked_address(target: httpx.URL, policy: MediaPolicy, label: str) -> IPAddress:
    """The address to connect to: the host resolved once, refused if ANY of its addresses is not allowed (a host
    that also resolves inward is not to be trusted with whichever answer comes first)."""
    host = target.raw_host.decode("ascii")  # IDNA-encoded by httpx; an IPv6 literal without its brackets
    loop = asyncio.get_running_loop()
    try:
        answers = await loop.getaddrinfo(host, _default_port(target), type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise MediaError(f"{label}: the host {target.host!r} could not be resolved ({_describe(e)})") from None
    addresses = [ipaddress.ip_address(sockaddr[0]) for *_, sockaddr in answers]
    if not addresses:
        raise MediaError(f"{label}: the host {target.host!r} resolves to no address")
    # The address is not named: it could tell a stranger about the server's own network.
    if not all(policy.address_allowed(address) for address in addresses):
        raise MediaError(f"{label}: the host {target.host!r} resolves to a non-public address (private, loopback, "
                         "link-local or otherwise reserved); images are fetched only from public hosts")
    return addresses[0]


async def _fetch_or_redirect(target: httpx.URL, address: IPAddress, policy: MediaPolicy, label: str) -> bytes | str:
    """The body of a 2xx answer, or the URL a redirect points to."""
    # The URL names the checked address, so nothing resolves the host again; the Host header and the TLS server
    # name (SNI, and the name the certificate must match) stay the host's.
    pinned = target.copy_with(host=str(address))
    headers = {"Host": target.netloc.decode("ascii"), "Accept": "image/*",
               # identity: the byte cap then counts what is stored, not what a small compressed body expands to.
               "Accept-Encoding": "identity", "User-Agent": "llava-next"}
    request = httpx.Request("GET", pinned, headers=headers, extensions={
        "sni_hostname": target.raw_host.decode("ascii"), "timeout": httpx.Timeout(policy.fetch_timeout).as_dict()})
    # A bare transport, not a client: a client keeps cookies, follows redirects and reads proxies and credentials
    # from the environment; this sends exactly the request above, once.
    async with httpx.AsyncHTTPTransport(verify=_tls_context(), trust_env=False, retries=0) as transport:
        response = await transport.handle_async_request(request)
        try:
            if response.status_code in _REDIRECT_STATUSES and "location" in response.headers:
                return _redirect_target(target, response.headers["location"], label)
            if not response.is_success:
                raise MediaError(f"{label}: the server answered HTTP {response.status_code} for "
                                 f"{_printable_url(str(target))}")
            return await _body_within_limit(response, policy, label)
        finally:
            await response.aclose()


def _redirect_target(target: httpx.URL, location: str, label: str) -> str:
    scheme = _SCHEME.match(location)
    if scheme and scheme.group(1).lower() not in ("http", "https"):
        # A redirect must not turn a download into a local file read (file:) or anything else.
        raise MediaError(f"{label}: {_printable_url(str(target))} redirects to {_printable_url(location, 60)}; only "
                         "http(s):// redirects are followed")
    return str(target.join(location))


async def _body_within_limit(response: httpx.Response, policy: MediaPolicy, label: str) -> bytes:
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise MediaError(f"{label}: the server sent the image {_printable_url(encoding, 20)}-encoded although none "
                         "was asked for; give a URL that serves the image file as it is")
    limit = policy.max_image_bytes
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise MediaError(f"{label}: the server says the image is {int(declared)} bytes, over the limit of {limit} "
                         "bytes per image; give a smaller image", PAYLOAD_TOO_LARGE)
    chunks, received = [], 0
    async for chunk in response.aiter_raw():
        received += len(chunk)
        if received > limit:  # stop reading here: the rest is never downloaded
            raise MediaError(f"{label}: the download passed the limit of {limit} bytes per image; give a smaller "
                             "image", PAYLOAD_TOO_LARGE)
        chunks.append(chunk)
    return b"".join(chunks)


def _describe(e: BaseException) -> str:
    message = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return ascii(message[:200])[1:-1] if message else type(e).__name__  # escaped: no control characters in logs


# ---------------------------------------------------------------------------------------------------------------------
# file:// URLs and plain paths


def _local_file(url: str, scheme: str | None, policy: MediaPolicy, label: str) -> Path:
    """The real path of a local image inside the allowed directory. Whether a path outside it exists is never told:
    every path outside gets the same answer."""
    if policy.allowed_local_path is None:
        raise MediaError(f"{label}: this server does not read local files; send the image inline as a data: URL, "
                         f"or start the server with {LOCAL_FLAG} DIRECTORY")
    try:
        root = policy.allowed_local_path.resolve(strict=True)
    except OSError as e:
        raise MediaError(f"{label}: the server's {LOCAL_FLAG} directory cannot be used ({_describe(e)})") from None
    if scheme == "file":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise MediaError(f"{label}: {_printable_url(url)} names the host {parts.netloc!r}; a file URL names a "
                             "file on this server: file:///path/to/image.png (three slashes)")
        if parts.query or parts.fragment:
            raise MediaError(f"{label}: {_printable_url(url)} has a query or fragment; write '?' and '#' in file "
                             "names as %3F and %23")
        path = Path(os.fsdecode(unquote_to_bytes(parts.path)))
        if not path.is_absolute():
            raise MediaError(f"{label}: {_printable_url(url)}: a file URL needs an absolute path, as in "
                             "file:///path/to/image.png")
    else:
        path = Path(url)  # a relative path is relative to the allowed directory, not to the server's cwd
    try:
        # Containment is decided on the real path (symlinks and ".." resolved), compared by path components, so
        # /data-evil/x is not inside /data.
        real = (root / path).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a NUL byte in the name
        raise MediaError(f"{label}: {_printable_url(url)} cannot be read ({_describe(e)})") from None
    if not real.is_relative_to(root):
        raise MediaError(f"{label}: {_printable_url(url)} is outside the directory this server reads images from "
                         f"({LOCAL_FLAG}); give a file inside it")
    # decode_image reads only a regular file (never a directory, a FIFO or a device, which could block or never
    # end) and at most max_image_bytes + 1 bytes of it. Someone who can write into the directory could still swap a
    # symlink in after the check; the directory is the operator's, so that is out of scope.
    return real
