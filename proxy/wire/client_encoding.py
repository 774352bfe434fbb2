"""Statement text in the client's encoding.

The server converts what a client sends from its client_encoding, so the
proxy reads statement text the same way before it parses it. Values sealed
from literals are the bytes as the client sent them, as for parameters, and
are returned as those same bytes.
"""

from __future__ import annotations

from proxy.errors import StatementRejected

# PostgreSQL encoding names, as ParameterStatus reports them, and the Python
# codec for each. MULE_INTERNAL and EUC_TW have no Python codec.
_CODECS = {
    "UTF8": "utf-8",
    "LATIN1": "latin-1",
    "LATIN2": "iso8859-2",
    "LATIN3": "iso8859-3",
    "LATIN4": "iso8859-4",
    "LATIN5": "iso8859-9",
    "LATIN6": "iso8859-10",
    "LATIN7": "iso8859-13",
    "LATIN8": "iso8859-14",
    "LATIN9": "iso8859-15",
    "LATIN10": "iso8859-16",
    "ISO_8859_5": "iso8859-5",
    "ISO_8859_6": "iso8859-6",
    "ISO_8859_7": "iso8859-7",
    "ISO_8859_8": "iso8859-8",
    "WIN1250": "cp1250",
    "WIN1251": "cp1251",
    "WIN1252": "cp1252",
    "WIN1253": "cp1253",
    "WIN1254": "cp1254",
    "WIN1255": "cp1255",
    "WIN1256": "cp1256",
    "WIN1257": "cp1257",
    "WIN1258": "cp1258",
    "WIN866": "cp866",
    "WIN874": "cp874",
    "KOI8R": "koi8-r",
    "KOI8U": "koi8-u",
    "EUC_JP": "euc-jp",
    "EUC_CN": "gb2312",
    "EUC_KR": "euc-kr",
    "EUC_JIS_2004": "euc-jis-2004",
    # PostgreSQL's SJIS, BIG5, GBK and UHC are the Windows code pages.
    "SJIS": "cp932",
    "SHIFT_JIS_2004": "shift-jis-2004",
    "BIG5": "cp950",
    "GBK": "cp936",
    "UHC": "cp949",
    "GB18030": "gb18030",
    "JOHAB": "johab",
}


def python_codec(client_encoding: str, server_encoding: str) -> str | None:
    """Return the Python codec that reads the client's text, or None if none does.

    With client_encoding SQL_ASCII the server converts nothing and checks the
    bytes against the database encoding. A SQL_ASCII database takes any
    bytes, which latin-1 reads one character per byte.
    """
    name = client_encoding.upper()
    if name == "SQL_ASCII":
        if server_encoding.upper() == "SQL_ASCII":
            return "latin-1"
        name = server_encoding.upper()
    return _CODECS.get(name)


def decode_statement(sql: str, codec: str | None, client_encoding: str) -> str:
    """Return statement text as the server reads it in the client encoding.

    `sql` is the message's text read as UTF-8 with surrogate escapes, so any
    bytes survive. Raises StatementRejected for bytes that are invalid in the
    client encoding (22021, as the server reports them), or for non-ASCII
    text in an encoding without a Python codec (0A000).
    """
    if sql.isascii():
        return sql
    raw = sql.encode("utf-8", "surrogateescape")
    if codec is None:
        raise StatementRejected(
            "0A000",
            f"the proxy cannot read non-ASCII statement text in client encoding "
            f"{client_encoding}",
            "Set client_encoding to UTF8 or another encoding the proxy supports.",
        )
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as exc:
        # The offending bytes are part of the statement, so they stay out.
        raise StatementRejected(
            "22021",
            f'invalid byte sequence for encoding "{client_encoding}" at byte '
            f"{exc.start + 1} of the statement",
            "Send the statement text in the encoding that client_encoding names.",
        ) from None


def encode_statement(text: str, codec: str | None) -> str:
    """Return `text` as message text: its client-encoding bytes read as UTF-8.

    This is the inverse of decode_statement, so Parse and Query encode it
    back to the bytes in the client encoding.
    """
    if text.isascii() or codec is None:
        return text
    return text.encode(codec).decode("utf-8", "surrogateescape")
