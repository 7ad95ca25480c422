/**
 * The Prometheus metrics of a server (`GET /metrics`), on a registry of its own so that several servers in one
 * process do not collide. Images per second is `rate(scalekv_images_total[1m])`.
 */
import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { Engine } from '../engine.js';
import { MEMORY_CATEGORIES } from '../engine.js';

export class ServerMetrics {
  readonly registry = new Registry();
  readonly queueDepth: Gauge;
  readonly batchImages: Histogram;
  readonly batchRequests: Histogram;
  readonly batchSeconds: Histogram;
  readonly scaleSeconds: Histogram;
  readonly images: Counter;
  readonly requests: Counter<'outcome'>;
  readonly rejections: Counter<'reason'>;
  readonly kvBytes: Gauge;

  /** `depth`: requests waiting (read at scrape time); `engine`: the local model's engine, for memory gauges. */
  constructor(o: { depth: () => number | Promise<number>; engine?: Engine }) {
    const registers = [this.registry];
    this.queueDepth = new Gauge({
      name: 'scalekv_queue_depth', help: 'Requests waiting for a batch', registers,
      async collect() {
        this.set(await o.depth());
      },
    });
    const sizes = [1, 2, 4, 8, 16, 32, 64];
    this.batchImages = new Histogram({ name: 'scalekv_batch_images', help: 'Images per batch', buckets: sizes, registers });
    this.batchRequests = new Histogram({ name: 'scalekv_batch_requests', help: 'Requests per batch', buckets: sizes, registers });
    this.batchSeconds = new Histogram({ name: 'scalekv_batch_seconds', help: 'Time per batch (sampling, decode, PNG)', buckets: [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60], registers });
    this.scaleSeconds = new Histogram({ name: 'scalekv_scale_seconds', help: 'Time per sampled scale', buckets: [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5], registers });
    this.images = new Counter({ name: 'scalekv_images_total', help: 'Images generated and delivered or dropped', registers });
    this.requests = new Counter({ name: 'scalekv_requests_total', help: 'Requests settled, by outcome', labelNames: ['outcome'], registers });
    this.rejections = new Counter({ name: 'scalekv_rejections_total', help: 'Requests refused, by reason', labelNames: ['reason'], registers });
    this.kvBytes = new Gauge({ name: 'scalekv_kv_cache_bytes', help: 'KV cache bytes held by the last batch', registers });
    if (o.engine) {
      const engine = o.engine;
      new Gauge({
        name: 'scalekv_engine_bytes', help: 'Bytes of live tensors by category', labelNames: ['category'], registers,
        collect() {
          const m = engine.memory();
          for (const c of MEMORY_CATEGORIES) this.set({ category: c }, m.inUse[c]);
        },
      });
      new Gauge({
        name: 'scalekv_device_reserved_bytes', help: 'Device bytes the engine holds (live tensors and its cache)', registers,
        collect() {
          this.set(engine.memory().reserved);
        },
      });
    }
  }
}
