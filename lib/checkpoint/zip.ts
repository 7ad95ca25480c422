import { closeSync, fstatSync, openSync, read, readSync } from 'node:fs';
import { fail } from '../errors.js';

/**
 * A minimal reader for the ZIP archives torch.save writes (STORED entries, ZIP64 when large). Only the directory is
 * read at open; entry data is read by byte range, so multi-GB archives are never loaded whole. Every offset and size
 * is checked against the file before use, so a truncated or forged archive fails with ERR_FORMAT, not a bad read.
 */

export interface ZipEntry {
  name: string;
  /** Absolute file offset of the entry's first data byte (after its local header). */
  dataStart: number;
  size: number;
}

const SIG_EOCD = 0x06054b50;
const SIG_ZIP64_LOCATOR = 0x07064b50;
const SIG_ZIP64_EOCD = 0x06064b50;
const SIG_CENTRAL = 0x02014b50;
const SIG_LOCAL = 0x04034b50;
const EOCD_SIZE = 22;
const MAX_COMMENT = 0xffff;
const MAX_CENTRAL_DIR = 256 << 20;
/** Per read call: stays below the 2 GiB limit of fs.read and keeps progress visible for large tensors. */
const CHUNK = 64 << 20;

export class ZipReader {
  readonly path: string;
  readonly size: number;
  readonly #entries = new Map<string, ZipEntry>();
  #fd: number | null;

  constructor(path: string) {
    this.path = path;
    this.#fd = openSync(path, 'r');
    try {
      this.size = fstatSync(this.#fd).size;
      this.#readDirectory();
    } catch (e) {
      this.close();
      throw e;
    }
  }

  get names(): string[] {
    return [...this.#entries.keys()];
  }

  entry(name: string): ZipEntry | undefined {
    return this.#entries.get(name);
  }

  /** `length` bytes of entry `name` starting `offset` bytes into it. */
  readSync(name: string, offset = 0, length?: number): Buffer {
    const { fd, pos, len } = this.#range(name, offset, length);
    const buf = Buffer.alloc(len);
    for (let done = 0; done < len; ) {
      const n = readSync(fd, buf, done, Math.min(CHUNK, len - done), pos + done);
      if (n <= 0) fail('ERR_FORMAT', `${this.path}: entry ${name} ends early (file shrank while open?)`);
      done += n;
    }
    return buf;
  }

  async read(name: string, offset = 0, length?: number): Promise<Buffer> {
    const { fd, pos, len } = this.#range(name, offset, length);
    const buf = Buffer.alloc(len);
    for (let done = 0; done < len; ) {
      const n = await new Promise<number>((res, rej) =>
        read(fd, buf, done, Math.min(CHUNK, len - done), pos + done, (err, bytes) => (err ? rej(err) : res(bytes))),
      );
      if (n <= 0) fail('ERR_FORMAT', `${this.path}: entry ${name} ends early (file shrank while open?)`);
      done += n;
    }
    return buf;
  }

  close(): void {
    if (this.#fd !== null) {
      closeSync(this.#fd);
      this.#fd = null;
    }
  }

  #range(name: string, offset: number, length: number | undefined): { fd: number; pos: number; len: number } {
    if (this.#fd === null) fail('ERR_DISPOSED', `${this.path}: archive was closed`);
    const e = this.#entries.get(name);
    if (!e) fail('ERR_FORMAT', `${this.path}: no entry ${name} in the archive`);
    const len = length ?? e.size - offset;
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(len) || offset < 0 || len < 0 || offset + len > e.size)
      fail('ERR_FORMAT', `${this.path}: bytes [${offset}, ${offset + len}) lie outside entry ${name} (${e.size} bytes)`);
    return { fd: this.#fd, pos: e.dataStart + offset, len };
  }

  #bytes(pos: number, len: number, what: string): Buffer {
    if (pos < 0 || len < 0 || pos + len > this.size)
      fail('ERR_FORMAT', `${this.path}: ${what} at [${pos}, ${pos + len}) lies beyond the end of the file (${this.size} bytes; truncated?)`);
    const buf = Buffer.alloc(len);
    for (let done = 0; done < len; ) {
      const n = readSync(this.#fd!, buf, done, len - done, pos + done);
      if (n <= 0) fail('ERR_FORMAT', `${this.path}: ${what} could not be read (file truncated?)`);
      done += n;
    }
    return buf;
  }

  #readDirectory(): void {
    const p = this.path;
    if (this.size < EOCD_SIZE) fail('ERR_FORMAT', `${p}: ${this.size} bytes is too short for a zip archive`);
    const tailLen = Math.min(this.size, EOCD_SIZE + MAX_COMMENT);
    const tail = this.#bytes(this.size - tailLen, tailLen, 'end of archive');
    let at = -1;
    // Scan backwards; a signature is accepted only where its comment length reaches exactly to the end of the file,
    // so a signature-like byte run inside a comment or inside data is not taken for the real record.
    for (let i = tailLen - EOCD_SIZE; i >= 0; i--) {
      if (tail.readUInt32LE(i) === SIG_EOCD && i + EOCD_SIZE + tail.readUInt16LE(i + 20) === tailLen) {
        at = i;
        break;
      }
    }
    if (at < 0) fail('ERR_FORMAT', `${p}: no end-of-central-directory record (not a zip archive, or truncated)`);
    const eocdPos = this.size - tailLen + at;
    let disk = tail.readUInt16LE(at + 4);
    let cdDisk = tail.readUInt16LE(at + 6);
    let count: number = tail.readUInt16LE(at + 10);
    let diskCount: number = tail.readUInt16LE(at + 8);
    let cdSize: number = tail.readUInt32LE(at + 12);
    let cdOffset: number = tail.readUInt32LE(at + 16);
    let cdLimit = eocdPos;

    const locPos = eocdPos - 20;
    const hasLocator = locPos >= 0 && this.#bytes(locPos, 4, 'zip64 locator').readUInt32LE(0) === SIG_ZIP64_LOCATOR;
    if (hasLocator) {
      const loc = this.#bytes(locPos, 20, 'zip64 locator');
      const z64Pos = num(loc.readBigUInt64LE(8), p, 'zip64 end-of-directory offset');
      if (z64Pos + 56 > locPos) fail('ERR_FORMAT', `${p}: zip64 end-of-directory offset ${z64Pos} is out of range`);
      const z = this.#bytes(z64Pos, 56, 'zip64 end-of-directory record');
      if (z.readUInt32LE(0) !== SIG_ZIP64_EOCD) fail('ERR_FORMAT', `${p}: zip64 end-of-directory record missing at ${z64Pos}`);
      disk = z.readUInt32LE(16);
      cdDisk = z.readUInt32LE(20);
      diskCount = num(z.readBigUInt64LE(24), p, 'entry count');
      count = num(z.readBigUInt64LE(32), p, 'entry count');
      cdSize = num(z.readBigUInt64LE(40), p, 'central directory size');
      cdOffset = num(z.readBigUInt64LE(48), p, 'central directory offset');
      cdLimit = z64Pos;
    } else if (count === 0xffff || cdSize === 0xffffffff || cdOffset === 0xffffffff) {
      fail('ERR_FORMAT', `${p}: zip64 sizes announced but the zip64 locator is missing (truncated?)`);
    }
    if (disk !== 0 || cdDisk !== 0 || diskCount !== count) fail('ERR_FORMAT', `${p}: multi-disk zip archives are not supported`);
    if (cdOffset + cdSize > cdLimit)
      fail('ERR_FORMAT', `${p}: central directory [${cdOffset}, ${cdOffset + cdSize}) overruns the end records at ${cdLimit} (truncated?)`);
    if (cdSize > MAX_CENTRAL_DIR) fail('ERR_FORMAT', `${p}: central directory of ${cdSize} bytes is implausibly large`);
    if (count * 46 > cdSize) fail('ERR_FORMAT', `${p}: ${count} entries cannot fit a central directory of ${cdSize} bytes`);

    const cd = this.#bytes(cdOffset, cdSize, 'central directory');
    let o = 0;
    for (let i = 0; i < count; i++) {
      if (o + 46 > cd.length || cd.readUInt32LE(o) !== SIG_CENTRAL) fail('ERR_FORMAT', `${p}: central directory entry ${i} is malformed`);
      const flags = cd.readUInt16LE(o + 8);
      const method = cd.readUInt16LE(o + 10);
      let compSize: number = cd.readUInt32LE(o + 20);
      let size: number = cd.readUInt32LE(o + 24);
      const nameLen = cd.readUInt16LE(o + 28);
      const extraLen = cd.readUInt16LE(o + 30);
      const commentLen = cd.readUInt16LE(o + 32);
      let localOffset: number = cd.readUInt32LE(o + 42);
      const end = o + 46 + nameLen + extraLen + commentLen;
      if (end > cd.length) fail('ERR_FORMAT', `${p}: central directory entry ${i} overruns the directory`);
      const name = cd.toString('utf8', o + 46, o + 46 + nameLen);
      const extra = cd.subarray(o + 46 + nameLen, o + 46 + nameLen + extraLen);
      // ZIP64 extra field: 64-bit values, present only for the fields whose 32-bit slot is saturated, in this order.
      for (let x = 0; x + 4 <= extra.length; ) {
        const id = extra.readUInt16LE(x);
        const len = extra.readUInt16LE(x + 2);
        if (x + 4 + len > extra.length) fail('ERR_FORMAT', `${p}: entry ${name} has a malformed extra field`);
        if (id === 0x0001) {
          let y = x + 4;
          const take = (what: string): number => {
            if (y + 8 > x + 4 + len) fail('ERR_FORMAT', `${p}: entry ${name}: zip64 extra field lacks the ${what}`);
            const v = num(extra.readBigUInt64LE(y), p, what);
            y += 8;
            return v;
          };
          if (size === 0xffffffff) size = take('size');
          if (compSize === 0xffffffff) compSize = take('compressed size');
          if (localOffset === 0xffffffff) localOffset = take('local header offset');
        }
        x += 4 + len;
      }
      if (flags & 1) fail('ERR_FORMAT', `${p}: entry ${name} is encrypted`);
      if (method !== 0)
        fail('ERR_FORMAT', `${p}: entry ${name} uses compression method ${method}; only stored entries (as torch.save writes) are supported`);
      if (compSize !== size) fail('ERR_FORMAT', `${p}: stored entry ${name} has compressed size ${compSize} != size ${size}`);
      if (this.#entries.has(name)) fail('ERR_FORMAT', `${p}: duplicate entry ${name}`);
      this.#entries.set(name, { name, dataStart: this.#localData(name, localOffset, size, cdOffset), size });
      o = end;
    }
  }

  /** Reads the entry's local header (its extra field differs from the central one: torch pads data to 64 bytes there). */
  #localData(name: string, offset: number, size: number, limit: number): number {
    const p = this.path;
    if (offset + 30 > limit) fail('ERR_FORMAT', `${p}: entry ${name}: local header at ${offset} lies outside the data area`);
    const h = this.#bytes(offset, 30, `local header of ${name}`);
    if (h.readUInt32LE(0) !== SIG_LOCAL) fail('ERR_FORMAT', `${p}: entry ${name}: no local header at ${offset}`);
    const nameLen = h.readUInt16LE(26);
    const dataStart = offset + 30 + nameLen + h.readUInt16LE(28);
    if (dataStart + size > limit)
      fail('ERR_FORMAT', `${p}: entry ${name}: data [${dataStart}, ${dataStart + size}) overruns the data area (ends at ${limit}; truncated?)`);
    const local = this.#bytes(offset + 30, nameLen, `local name of ${name}`).toString('utf8');
    if (local !== name) fail('ERR_FORMAT', `${p}: entry ${name}: local header names ${JSON.stringify(local)}`);
    return dataStart;
  }
}

function num(v: bigint, path: string, what: string): number {
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) fail('ERR_FORMAT', `${path}: ${what} ${v} is out of range`);
  return Number(v);
}
