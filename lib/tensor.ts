/**
 * Tensors: contiguous memory on an engine's device. This module knows the engine only as a `TensorOwner`, so the
 * op layer (ops.ts) and the engine (engine.ts) both build on it without importing each other.
 */
import { bf16ToF32Array, DType, f16ToF32Array } from './dtype.js';
import { fail, rethrowNative } from './errors.js';
import type { NativeTensor } from './native.js';

export type HostArray = Float32Array | Uint16Array | Int32Array | Uint8Array;

/** What a tensor knows of its engine. */
export interface TensorOwner {
  readonly backend: string;
  readonly device: string;
  readonly disposed: boolean;
}

/** A contiguous tensor on an engine's device. Its contents are read back asynchronously. */
export class Tensor {
  readonly shape: readonly number[];
  readonly dtype: DType;
  /** @internal */
  readonly native: NativeTensor;
  /** The engine whose device holds it. */
  readonly engine: TensorOwner;

  /** @internal */
  constructor(engine: TensorOwner, native: NativeTensor, shape: readonly number[], dtype: DType) {
    this.engine = engine;
    this.native = native;
    this.shape = Object.freeze([...shape]);
    this.dtype = dtype;
  }

  get size(): number {
    return this.shape.reduce((a, b) => a * b, 1);
  }
  get bytes(): number {
    return this.native.bytes;
  }
  get disposed(): boolean {
    return this.native.disposed;
  }

  /** The contents after all work queued before this call: f32/bf16/f16 as Float32Array, i32, u8. */
  async read(): Promise<Float32Array | Int32Array | Uint8Array> {
    const raw = await this.readRaw();
    if (this.dtype === 'bf16') return bf16ToF32Array(raw as Uint16Array);
    if (this.dtype === 'f16') return f16ToF32Array(raw as Uint16Array);
    return raw as Float32Array | Int32Array | Uint8Array;
  }

  /** The stored bits: Uint16Array for bf16/f16. */
  async readRaw(): Promise<HostArray> {
    let buffer: ArrayBuffer;
    try {
      buffer = await this.native.read();
    } catch (e) {
      rethrowNative(e);
    }
    switch (this.dtype) {
      case 'f32':
        return new Float32Array(buffer);
      case 'bf16':
      case 'f16':
        return new Uint16Array(buffer);
      case 'i32':
        return new Int32Array(buffer);
      case 'u8':
        return new Uint8Array(buffer);
    }
  }

  /** Replaces the contents (in queue order). bf16/f16 take a Float32Array (rounded) or raw Uint16Array bits. */
  write(data: HostArray): void {
    try {
      this.native.write(data);
    } catch (e) {
      rethrowNative(e);
    }
  }

  /**
   * The same memory under another shape with as many elements: no copy, no allocation. Writes through either
   * are seen by both; the memory is released when the tensor and all its views are disposed.
   */
  view(shape: readonly number[]): Tensor {
    if (!Array.isArray(shape)) fail('ERR_SHAPE', 'view: shape must be an array of integers');
    try {
      return new Tensor(this.engine, this.native.view([...shape]), shape, this.dtype);
    } catch (e) {
      rethrowNative(e);
    }
  }

  /**
   * Releases this handle. Once no view of the same memory is left, the memory may serve the next allocation at
   * once: work already queued on this tensor runs before any work on the new one. Idempotent.
   */
  dispose(): void {
    this.native.dispose();
  }
}
