"""Decoded content of every leaf MIME part, read by Python's email package.

usage: mime_parts.py MESSAGE_FILE
Prints one JSON object per leaf part: {"type": "text/plain", "hex": "..."}
(the part's content after its Content-Transfer-Encoding is undone).
"""
import email
import json
import sys


def main():
    with open(sys.argv[1], "rb") as f:
        msg = email.message_from_bytes(f.read())
    for part in msg.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True) or b""
        print(json.dumps({"type": part.get_content_type(), "hex": payload.hex()}))


if __name__ == "__main__":
    main()
