<?php
// A load worker for the fill-race test (tests/tests/fill_race.rs), the PHP twin of
// tests/src/bin/fill-worker.rs, using the PHP client (src/Rtinval.php): writes rows and waits
// on the node barrier, reads through every configured cache (filling with the protocol's check,
// or with a plain SET of what was read), and counts reads that return a version older than one this worker already
// committed and waited for. One process, one request at a time, as a PHP-FPM worker runs.
//
// Usage: php fill_worker.php '<json spec>'; prints one JSON report.

declare(strict_types=1);

require __DIR__ . '/../src/Rtinval.php';

$spec = json_decode($argv[1] ?? '', true, flags: JSON_THROW_ON_ERROR);
mysqli_report(MYSQLI_REPORT_ERROR | MYSQLI_REPORT_STRICT);
$m = $spec['mysql'];
$db = new mysqli($m['host'], $m['user'], $m['password'], $m['db'], (int) $m['port']);
$barrier = new Rtinval\Barrier($spec['node']);

$caches = [];
foreach ($spec['caches'] as $c) {
    [$host, $port] = explode(':', preg_replace('#^[a-z]+://#', '', $c['addr']));
    if ($c['kind'] === 'redis') {
        $conn = new Redis();
        $conn->connect($host, (int) $port);
    } else {
        $conn = new Memcached();
        $conn->addServer($host, (int) $port);
        $conn->setOption(Memcached::OPT_COMPRESSION, false);
    }
    $cache = $c['kind'] === 'redis'
        ? Rtinval\NodeCache::redis($conn, $c['prefix'])
        : Rtinval\NodeCache::memcached($conn, $c['prefix']);
    $caches[] = ['spec' => $c, 'conn' => $conn, 'cache' => $cache];
}

$counts = [];
foreach (['reads', 'stale', 'fills', 'fills_rejected'] as $k) {
    foreach ($caches as $c) {
        $counts[$k][$c['spec']['name']] = 0;
    }
}
$own = [];
$writes = 0;
$waitFailures = 0;
$errors = 0;
$examples = [];
$staleKeys = [];

$load = function (int $id) use ($db): string {
    $st = $db->prepare('SELECT version FROM Object WHERE id = ?');
    $st->bind_param('i', $id);
    $st->execute();
    $row = $st->get_result()->fetch_row();
    return $id . ':' . ($row[0] ?? 0);
};
$think = function (bool $slow) use ($spec): void {
    if ($slow && $spec['think_ms'] > 0) {
        usleep(random_int(0, (int) $spec['think_ms']) * 1000);
    }
};

$read = function (int $i, int $id, bool $slow) use (&$caches, &$counts, &$own, &$errors, &$examples, &$staleKeys, $spec, $load, $think): void {
    $c = $caches[$i];
    $name = $c['spec']['name'];
    $key = Rtinval\key($spec['template'], ['id' => $id]);
    $full = $c['spec']['prefix'] . $key;
    // What this worker had committed and waited for when the read started.
    $mine = $own[$id] ?? 0;
    try {
        $r = $c['cache']->get($key);
        if ($r->hit) {
            $payload = $r->value;
        } elseif ($c['spec']['protocol']) {
            $payload = $load($id);
            $think($slow);
            $counts[$c['cache']->fill($r->token, $payload, (int) $spec['ttl_ms']) ? 'fills' : 'fills_rejected'][$name]++;
        } else {
            // Plain fills: the same read, stored without the marker check.
            $payload = $load($id);
            $think($slow);
            $value = Rtinval\Protocol::data($r->token->basis, $payload);
            if ($c['spec']['kind'] === 'redis') {
                $c['conn']->psetex($full, (int) $spec['ttl_ms'], $value);
            } else {
                $c['conn']->set($full, $value, intdiv((int) $spec['ttl_ms'] + 999, 1000));
            }
            $counts['fills'][$name]++;
        }
    } catch (Throwable $e) {
        $errors++;
        return;
    }
    $parts = explode(':', $payload);
    $seen = (int) end($parts);
    $counts['reads'][$name]++;
    if ($seen < $mine) {
        $counts['stale'][$name]++;
        $staleKeys[$name][$key] = true;
        if (count($examples) < 5) {
            $examples[] = "$name: $key read version $seen after this worker committed $mine";
        }
    }
};

$write = function (int $id) use ($db, $barrier, &$own, &$writes, &$waitFailures, &$examples): void {
    $db->begin_transaction();
    $st = $db->prepare('UPDATE Object SET version = version + 1 WHERE id = ?');
    $st->bind_param('i', $id);
    $st->execute();
    $st = $db->prepare('SELECT version FROM Object WHERE id = ?');
    $st->bind_param('i', $id);
    $st->execute();
    $v = (int) $st->get_result()->fetch_row()[0];
    $db->commit();
    $gtid = Rtinval\last_gtid($db);
    $writes++;
    try {
        $barrier->wait($gtid, 10000);
        $own[$id] = max($own[$id] ?? 0, $v);
    } catch (Rtinval\WaitException $e) {
        $waitFailures++;
        if (count($examples) < 5) {
            $examples[] = 'wait: ' . $e->status . ' ' . $e->getMessage();
        }
    }
};

$start = microtime(true);
$deadline = $start + $spec['seconds'];
$nextWrite = $start;
$nextRead = $start;
$writeEvery = 1 / max(0.001, $spec['write_rate']);
$readEvery = 1 / max(0.001, $spec['read_rate']);
$n = 0;
while (($now = microtime(true)) < $deadline) {
    if ($now >= $nextWrite) {
        $nextWrite += $writeEvery;
        $id = random_int(1, (int) $spec['rows']);
        try {
            $write($id);
        } catch (Throwable $e) {
            $errors++;
            continue;
        }
        // Read-your-writes: the row just written, through every cache, at once.
        foreach (array_keys($caches) as $i) {
            $read($i, $id, false);
        }
    } elseif ($now >= $nextRead) {
        $nextRead += $readEvery;
        $read($n++ % count($caches), random_int(1, (int) $spec['rows']), true);
    } else {
        usleep((int) (max(0, min($nextWrite, $nextRead) - $now) * 1e6));
    }
}

echo json_encode([
    'worker' => $spec['name'],
    'seconds' => microtime(true) - $start,
    'writes' => $writes,
    'wait_failures' => $waitFailures,
    'errors' => $errors,
    'reads' => $counts['reads'],
    'stale' => $counts['stale'],
    'fills' => $counts['fills'],
    'fills_rejected' => $counts['fills_rejected'],
    'examples' => $examples,
    'stale_keys' => (object) array_map('array_keys', $staleKeys),
]), "\n";
