import { readFileSync } from 'node:fs';
import { ScaleKVError } from '../errors.js';

/** A JSON file of a model directory: ERR_INVALID_ARG when it cannot be read, ERR_FORMAT when it is not JSON. */
export function readJsonFile(path: string, what: string): unknown {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    throw new ScaleKVError('ERR_INVALID_ARG', `${path}: cannot read the ${what} (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`, { cause: e });
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new ScaleKVError('ERR_FORMAT', `${path}: not JSON (${(e as Error).message})`, { cause: e });
  }
}
