#!/usr/bin/env node
// Prints 1 when node-gyp should build the CPU backend with oneDNN (its header and shared library are installed
// and SCALEKV_ONEDNN is not 0), else 0: binding.gyp's `onednn` variable.
import { existsSync } from 'node:fs';

const dirs = ['/usr/lib/x86_64-linux-gnu', '/usr/lib/aarch64-linux-gnu', '/usr/lib64', '/usr/lib', '/usr/local/lib'];
const found = existsSync('/usr/include/oneapi/dnnl/dnnl.hpp') && dirs.some((d) => existsSync(`${d}/libdnnl.so`));
console.log(process.env.SCALEKV_ONEDNN !== '0' && found ? 1 : 0);
