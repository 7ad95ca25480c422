// What the serve tests share: a redis-server of their own on a free loopback port, the CLI as a child process
// whose log lines they can wait for, and a server-sent-events reader.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createServer as createNetServer } from 'node:net';

/** A free TCP port on 127.0.0.1 (free when asked: the caller binds it right after). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createNetServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
  });
}

export function redisServerInstalled(): boolean {
  return spawnSync('redis-server', ['--version'], { encoding: 'utf8' }).status === 0;
}

export interface RedisInstance {
  url: string;
  stop(): Promise<void>;
}

/** Starts `redis-server` on a free loopback port with no persistence, and resolves once it accepts connections. */
export async function startRedis(): Promise<RedisInstance> {
  const port = await freePort();
  const child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: ['ignore', 'pipe', 'pipe'] });
  await waitForLine(child, /Ready to accept connections/, 10_000);
  return { url: `redis://127.0.0.1:${port}`, stop: async () => void (await stopChild(child, 'SIGTERM')) };
}

/** Resolves with the first line of the child's stdout or stderr that matches, or rejects when it exits first. */
export function waitForLine(child: ChildProcess, pattern: RegExp, timeoutMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    let seen = '';
    const timer = setTimeout(() => done(new Error(`no line matching ${pattern} within ${timeoutMs} ms; output:\n${seen}`)), timeoutMs);
    const onData = (b: Buffer) => {
      seen += b.toString();
      const line = seen.split('\n').find((l) => pattern.test(l));
      if (line !== undefined) done(undefined, line);
    };
    const onExit = (code: number | null) => done(new Error(`exited (${code}) before printing ${pattern}; output:\n${seen}`));
    const done = (e?: Error, line?: string) => {
      clearTimeout(timer);
      child.stdout?.off('data', onData);
      child.stderr?.off('data', onData);
      child.off('exit', onExit);
      if (e) reject(e);
      else resolve(line as string);
    };
    child.stdout?.on('data', onData);
    child.stderr?.on('data', onData);
    child.once('exit', onExit);
  });
}

/** Sends a signal and resolves with the exit code once the child has exited. */
export function stopChild(child: ChildProcess, signal: NodeJS.Signals): Promise<number | null> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(child.exitCode);
  return new Promise((resolve) => {
    child.once('exit', (code) => resolve(code));
    child.kill(signal);
  });
}

/** `scalekv <args>` from the sources, its output piped. */
export function spawnCli(args: string[]): ChildProcess {
  return spawn(process.execPath, ['--import=tsx', 'lib/cli.ts', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
}

export interface SseEvent {
  event: string;
  data: Record<string, unknown>;
}

/** Reads a job's event stream to its end, calling `onEvent` for each event as it arrives. */
export async function readEvents(url: string, onEvent: (e: SseEvent) => void = () => {}): Promise<SseEvent[]> {
  const res = await fetch(url);
  if (!res.ok || !res.body) throw new Error(`GET ${url}: ${res.status}`);
  const events: SseEvent[] = [];
  let buffer = '';
  const decoder = new TextDecoder();
  for await (const chunk of res.body) {
    buffer += decoder.decode(chunk as Uint8Array, { stream: true });
    let end: number;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = /^event: (.*)$/m.exec(block)?.[1] ?? 'message';
      const data = JSON.parse(/^data: (.*)$/m.exec(block)?.[1] ?? '{}') as Record<string, unknown>;
      events.push({ event, data });
      onEvent({ event, data });
    }
  }
  return events;
}

/** A metric's value from a Prometheus text exposition (the first sample of that name and labels). */
export function metricValue(text: string, name: string): number {
  const line = text.split('\n').find((l) => l.startsWith(`${name} `));
  if (line === undefined) throw new Error(`no metric ${name}`);
  return Number(line.slice(name.length + 1));
}
