/**
 * The control protocol's lifecycle end to end: the destination's Rust side acknowledges a
 * SYNC barrier without its JavaScript, neither side completes without the data, and a peer
 * that stops answering fails both sides with ERR_MULTIFD_TIMEOUT instead of hanging.
 */
import test from 'ava'
import { fileURLToPath } from 'node:url'
import { DEFAULT_PEER_TIMEOUT_MS, Destination, MultifdError, RamBlock, Source } from '../ts/index.js'
import { MiB, blockPair, fillRandom, rawControl, rawDestination, rejectionCode, spawnPeer, until } from './helpers.js'

const BUSY = fileURLToPath(new URL('./fixtures/busy-destination.ts', import.meta.url))

test('a sync resolves while the destination event loop is blocked: its Rust side acknowledges the barrier', async (t) => {
  t.timeout(60_000)
  const BLOCK_MS = 6000
  const peer = spawnPeer(['block', String(BLOCK_MS)], BUSY)
  try {
    const { address } = await peer.next('listening')
    const block = RamBlock.allocate({ name: 'ram', size: 4 * MiB })
    fillRandom(block)
    const source = await Source.connect({ address: String(address), blocks: [block], channels: 4 })
    await peer.next('blocking')
    await source.sendAll()
    const started = performance.now()
    const epoch = await until(source.sync(), BLOCK_MS / 2, 'a sync while the destination event loop is blocked')
    const ms = performance.now() - started
    t.is(epoch, 1)
    t.true(ms < BLOCK_MS / 2, `sync took ${ms.toFixed(0)} ms`)
    t.log(`sync round trip with the destination event loop blocked: ${ms.toFixed(1)} ms`)
    const summary = await until(source.complete(), 30_000, 'completion after the block')
    t.is(summary.status, 'completed')
    t.is((await peer.next('done')).status, 'completed')
  } finally {
    peer.child.kill('SIGKILL')
  }
})

test('a destination told complete before any announced channel connected fails with ERR_MULTIFD_OUT_OF_SEQUENCE, and says so', async (t) => {
  t.timeout(15_000)
  const { dst } = blockPair([['ram', MiB]])
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst })
  const peer = await rawControl(dest.address)
  try {
    peer.send({ type: 'hello', protocol: 1, session: 'ab'.repeat(16), channels: 4, pageSize: 4096, compression: 'none', blocks: [{ name: 'ram', length: MiB }] })
    t.like(await peer.next(), { type: 'welcome' })
    peer.send({ type: 'complete', epoch: 0 })
    t.is(await rejectionCode(dest.done), 'ERR_MULTIFD_OUT_OF_SEQUENCE')
    t.is(dest.state, 'failed')
    t.like(await peer.next(), { type: 'error', code: 'ERR_MULTIFD_OUT_OF_SEQUENCE' })
    t.is(dest.summary().bytes, 0)
  } finally {
    peer.socket.destroy()
    dest.close()
  }
})

for (const lie of [
  { what: 'synced for a sync it never sent', frames: [{ type: 'synced', epoch: 1, packetNum: 0 }, { type: 'completed' }] },
  { what: 'completed before it sent complete', frames: [{ type: 'completed' }] },
]) {
  test(`a source told ${lie.what} fails with ERR_MULTIFD_OUT_OF_SEQUENCE, and says so`, async (t) => {
    t.timeout(15_000)
    const fake = await rawDestination()
    const { src } = blockPair([['ram', MiB]])
    try {
      const migration = (async () => {
        const source = await Source.connect({ address: fake.address, blocks: src, channels: 2 })
        await source.sendAll()
        return source.complete()
      })()
      const control = await fake.control
      for (const f of lie.frames) control.send(f)
      t.is(await rejectionCode(until(migration, 10_000, 'the source to fail')), 'ERR_MULTIFD_OUT_OF_SEQUENCE')
      let frame = await control.next()
      while (frame && frame.type === 'ping') frame = await control.next()
      t.like(frame, { type: 'error', code: 'ERR_MULTIFD_OUT_OF_SEQUENCE' })
    } finally {
      fake.close()
    }
  })
}

test('a destination that reads everything but never acknowledges a sync fails both sides with ERR_MULTIFD_TIMEOUT', async (t) => {
  t.timeout(20_000)
  const fake = await rawDestination()
  const { src } = blockPair([['ram', MiB]])
  try {
    const source = await Source.connect({ address: fake.address, blocks: src, channels: 2, peerTimeoutMs: 500 })
    const control = await fake.control
    const pinger = setInterval(() => control.send({ type: 'ping' }), 100)
    const started = performance.now()
    try {
      await source.sendAll()
      t.is(await rejectionCode(until(source.sync(), 10_000, 'the source to give up on the acknowledgement')), 'ERR_MULTIFD_TIMEOUT')
    } finally {
      clearInterval(pinger)
    }
    t.true(performance.now() - started < 5000)
    let frame = await control.next()
    while (frame && frame.type === 'ping') frame = await control.next()
    t.like(frame, { type: 'error', code: 'ERR_MULTIFD_TIMEOUT' })
  } finally {
    fake.close()
  }
})

test('the no-progress bound is on by default (30 s) and 0 turns it off', async (t) => {
  t.is(DEFAULT_PEER_TIMEOUT_MS, 30_000)
  const fake = await rawDestination()
  const { src, dst } = blockPair([['ram', MiB]])
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst })
  try {
    const source = await Source.connect({ address: fake.address, blocks: src, channels: 1 })
    t.is(source.peerTimeoutMs, 30_000)
    t.is(dest.peerTimeoutMs, 30_000)
    const off = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst, peerTimeoutMs: 0 })
    t.is(off.peerTimeoutMs, 0)
    off.close()
    await source.cancel()
  } finally {
    fake.close()
    dest.close()
  }
  t.throws(() => Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst, peerTimeoutMs: 50 }), { instanceOf: MultifdError, message: /peerTimeoutMs/ })
})

test('a source speaks the documented JSON, and a frame no destination sends (synced for epoch 0) fails it with ERR_MULTIFD_PROTOCOL, telling the peer', async (t) => {
  t.timeout(20_000)
  const fake = await rawDestination()
  const { src } = blockPair([['ram', MiB]])
  try {
    const source = await Source.connect({ address: fake.address, blocks: src, channels: 1, integrity: 'xxh3' })
    const control = await fake.control
    t.deepEqual(Object.keys(control.hello), ['type', 'protocol', 'session', 'channels', 'pageSize', 'compression', 'blocks', 'integrity'])
    t.deepEqual(control.hello, { type: 'hello', protocol: 1, session: source.session, channels: 1, pageSize: 4096, compression: 'none', blocks: [{ name: 'ram', length: MiB }], integrity: 'xxh3' })
    control.send({ type: 'synced', epoch: 0, packetNum: 0 })
    t.is(await rejectionCode(until(source.done, 10_000, 'the source to refuse the frame')), 'ERR_MULTIFD_PROTOCOL')
    let frame = await control.next()
    while (frame && frame.type === 'ping') frame = await control.next()
    t.like(frame, { type: 'error', code: 'ERR_MULTIFD_PROTOCOL' })
  } finally {
    fake.close()
  }
})

test('a destination refuses a hello naming a block twice with ERR_MULTIFD_DUPLICATE_BLOCK before asking for blocks, and says so', async (t) => {
  t.timeout(20_000)
  let asked = 0
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: () => (asked++, []) })
  try {
    const c = await rawControl(dest.address)
    c.send({ type: 'hello', protocol: 1, session: 'ab'.repeat(16), channels: 1, pageSize: 4096, compression: 'none', blocks: [{ name: 'a', length: 4096 }, { name: 'a', length: 4096 }] })
    t.is(await rejectionCode(until(dest.done, 10_000, 'the destination to refuse the hello')), 'ERR_MULTIFD_DUPLICATE_BLOCK')
    t.is(asked, 0)
    t.like(await c.next(), { type: 'error', code: 'ERR_MULTIFD_DUPLICATE_BLOCK' })
    c.socket.destroy()
  } finally {
    dest.close()
  }
})
