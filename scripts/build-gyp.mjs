#!/usr/bin/env node
// The CPU-only node-gyp build (for machines without CMake; CI builds it too), its log on stdout.
import { buildWithGyp } from './build-native.mjs';

const r = buildWithGyp();
process.stdout.write(r.log);
process.exitCode = r.ok ? 0 : 1;
