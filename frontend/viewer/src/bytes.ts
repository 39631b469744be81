// BASE64 chunks carry bytes that are not valid UTF-8: shown as text where they decode, and every
// other byte as \xNN, so a binary stream reads like `cat -v` and never as replacement characters.

const HEX = '0123456789abcdef';

export function decodeBase64(data: string): Uint8Array {
  const text = atob(data);
  const bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i += 1) bytes[i] = text.charCodeAt(i);
  return bytes;
}

/** The length of the valid UTF-8 sequence at bytes[i], or 0 where none starts there. */
function sequenceLength(bytes: Uint8Array, i: number): number {
  const first = bytes[i];
  let length: number;
  let min: number;
  if (first < 0x80) return 1;
  if (first >= 0xc2 && first <= 0xdf) [length, min] = [2, 0x80];
  else if (first >= 0xe0 && first <= 0xef) [length, min] = [3, 0x800];
  else if (first >= 0xf0 && first <= 0xf4) [length, min] = [4, 0x10000];
  else return 0;
  if (i + length > bytes.length) return 0;
  let code = first & (0xff >> (length + 1));
  for (let k = 1; k < length; k += 1) {
    const next = bytes[i + k];
    if ((next & 0xc0) !== 0x80) return 0;
    code = (code << 6) | (next & 0x3f);
  }
  if (code < min || code > 0x10ffff || (code >= 0xd800 && code <= 0xdfff)) return 0;
  return length;
}

/** Bytes as text: valid UTF-8 as itself, newlines, tabs and ESC kept, any other byte as \xNN. */
export function escapeBytes(bytes: Uint8Array): string {
  const decoder = new TextDecoder();
  let out = '';
  let i = 0;
  while (i < bytes.length) {
    const length = sequenceLength(bytes, i);
    const byte = bytes[i];
    const control = length === 1 && byte < 0x20 && byte !== 0x0a && byte !== 0x09 && byte !== 0x1b;
    if (length === 0 || control || byte === 0x7f) {
      out += `\\x${HEX[byte >> 4]}${HEX[byte & 15]}`;
      i += 1;
    } else {
      out += length === 1 ? String.fromCharCode(byte) : decoder.decode(bytes.subarray(i, i + length));
      i += length;
    }
  }
  return out;
}
