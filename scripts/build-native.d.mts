export declare const BACKENDS: string[];
export declare class NativeBuildError extends Error {}
export declare function buildablePrerequisites(): { cmake?: string; nvcc?: string; why: Record<string, string | undefined> };
export declare function buildFromSource(opts?: { backends?: string[]; jobs?: string | number }): { tool: 'cmake-js' | 'node-gyp'; backends: string[]; notes: string[] };
export declare function buildWithGyp(): { ok: boolean; log: string };
export declare function loadablePrebuilt(): { name: string; path: string; backends: string } | undefined;
