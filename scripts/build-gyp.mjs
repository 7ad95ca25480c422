#!/usr/bin/env node
// The CPU-only node-gyp build (for machines without CMake), against the running Node's own headers when
// they are installed, so nothing is downloaded.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const local = join(root, 'node_modules', '.bin', 'node-gyp');
const gyp = existsSync(local) ? local : process.env.npm_config_node_gyp || 'node-gyp';
const args = ['rebuild'];
const nodePrefix = dirname(dirname(process.execPath));
if (!process.env.npm_config_nodedir && existsSync(join(nodePrefix, 'include/node/node_api.h')))
  args.push(`--nodedir=${nodePrefix}`);
const [cmd, cmdArgs] = gyp.endsWith('.js') ? [process.execPath, [gyp, ...args]] : [gyp, args];
const r = spawnSync(cmd, cmdArgs, { cwd: root, stdio: ['ignore', 'inherit', 'inherit'] });
process.exit(r.status ?? 1);
