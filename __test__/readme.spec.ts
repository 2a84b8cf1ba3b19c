/**
 * The README's code cannot rot: every ```ts sample is type-checked against the facade (as a
 * module importing 'multifd'), every `multifd ...` command line in a ```sh sample names a
 * command and flags that command's help documents, and every `npm run X` names a script.
 *
 * A sample may be preceded by `<!-- ts-context: DECLARATIONS -->` (invisible on the page) that
 * declares what the sample takes as given, such as `declare const blocks: RamBlock[]`.
 */
import test from 'ava'
import { execFileSync } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import ts from 'typescript'

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..')
const readme = readFileSync(join(root, 'README.md'), 'utf8')

interface Sample {
  lang: string
  code: string
  context: string
  line: number
}

function samples(): Sample[] {
  const out: Sample[] = []
  const re = /(?:<!-- ts-context:([\s\S]*?)-->\s*\n)?```(\w+)\n([\s\S]*?)```/g
  for (let m = re.exec(readme); m; m = re.exec(readme)) {
    out.push({ lang: m[2]!, code: m[3]!, context: (m[1] ?? '').trim(), line: readme.slice(0, m.index).split('\n').length })
  }
  return out
}

test('every TypeScript sample in README.md type-checks against the facade', (t) => {
  const ts_ = samples().filter((s) => s.lang === 'ts')
  t.true(ts_.length >= 4, 'the README has its API samples')
  const files = new Map<string, string>()
  for (const s of ts_) {
    // The context's imports go first so that a sample's own imports may follow them.
    const context = s.context ? `import type { RamBlock as __RamBlock } from 'multifd'\n${s.context}\n` : ''
    files.set(join(root, '__test__', `readme-line-${s.line}.ts`), `${context}${s.code}\nexport {}\n`)
  }
  const options: ts.CompilerOptions = {
    target: ts.ScriptTarget.ES2022,
    module: ts.ModuleKind.NodeNext,
    moduleResolution: ts.ModuleResolutionKind.NodeNext,
    lib: ['lib.es2022.d.ts'],
    types: ['node'],
    strict: true,
    noEmit: true,
    skipLibCheck: true,
    esModuleInterop: true,
    allowImportingTsExtensions: true,
    baseUrl: root,
    paths: { multifd: ['ts/index.ts'] },
  }
  const host = ts.createCompilerHost(options)
  const getSourceFile = host.getSourceFile.bind(host)
  host.getSourceFile = (name, language, onError) => {
    const text = files.get(name)
    return text === undefined ? getSourceFile(name, language, onError) : ts.createSourceFile(name, text, language)
  }
  const fileExists = host.fileExists.bind(host)
  host.fileExists = (name) => files.has(name) || fileExists(name)
  const program = ts.createProgram([...files.keys()], options, host)
  const problems = ts
    .getPreEmitDiagnostics(program)
    .filter((d) => d.file && files.has(d.file.fileName))
    .map((d) => {
      const { line } = d.file!.getLineAndCharacterOfPosition(d.start ?? 0)
      return `${d.file!.fileName.replace(/.*readme-line-(\d+)\.ts$/, 'README.md sample at line $1')}, its line ${line + 1}: ${ts.flattenDiagnosticMessageText(d.messageText, '\n')}`
    })
  t.deepEqual(problems, [])
})

const helpCache = new Map<string, string>()
function helpFor(command: string): string {
  let h = helpCache.get(command)
  if (h === undefined) {
    h = execFileSync(process.execPath, ['--import=tsx', join(root, 'ts/cli/main.ts'), 'help', command], { encoding: 'utf8', timeout: 30_000 })
    helpCache.set(command, h)
  }
  return h
}

test('every multifd command line in README.md uses a command and flags its help documents', (t) => {
  const lines = samples()
    .filter((s) => s.lang === 'sh')
    .flatMap((s) => s.code.split('\n'))
    .map((l) => l.replace(/#.*$/, '').trim())
    .filter((l) => /^(npx )?multifd /.test(l))
  t.true(lines.length >= 5, 'the README shows the command line')
  const usage = helpFor('')
  const problems: string[] = []
  for (const l of lines) {
    const [command, ...args] = l.replace(/^(npx )?multifd /, '').split(/\s+/)
    if (!new RegExp(`^  ${command} `, 'm').test(usage)) {
      problems.push(`${l}: no command ${command}`)
      continue
    }
    const help = helpFor(command!)
    for (const flag of args.filter((a) => a.startsWith('--'))) {
      const name = flag.split('=')[0]!
      if (!help.includes(name)) problems.push(`${l}: ${name} is not in 'multifd help ${command}'`)
    }
  }
  t.deepEqual(problems, [])
})

test('every npm run script and bench command the README names exists', (t) => {
  const scripts = (JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { scripts: Record<string, string> }).scripts
  const problems: string[] = []
  for (const m of readme.matchAll(/npm run (\w[\w:-]*)/g)) if (!(m[1]! in scripts)) problems.push(`npm run ${m[1]}: no such script`)
  for (const m of readme.matchAll(/`(bench\/[a-z]+)[ `]/g)) {
    try {
      readFileSync(join(root, m[1]!))
    } catch {
      problems.push(`${m[1]}: no such file`)
    }
  }
  t.deepEqual(problems, [])
})
